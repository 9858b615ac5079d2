"""keras_das: differentiable neural architecture search (the DARTS family) for Keras 3."""

from keras_das import latency
from keras_das import ops
from keras_das import plot
from keras_das import relaxations
from keras_das import remedies
from keras_das import schedules
from keras_das.discrete_network import DiscreteNetwork
from keras_das.discretize import discretize
from keras_das.export import export
from keras_das.fused_cell import FusedSearchCell
from keras_das.genotype import DARTS_V1
from keras_das.genotype import DARTS_V2
from keras_das.genotype import GENOTYPES
from keras_das.genotype import Genotype
from keras_das.genotype import derive_genotype
from keras_das.mixed_op import MixedOp
from keras_das.ops import DARTS_OPS
from keras_das.ops import register_op
from keras_das.search_model import SearchModel
from keras_das.search_model import pair_datasets
from keras_das.search_network import SearchCell
from keras_das.search_network import SearchNetwork
from keras_das.variables import arch_variables
from keras_das.variables import weight_variables

__version__ = "0.1.0"

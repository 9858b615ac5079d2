"""keras_das: differentiable neural architecture search (the DARTS family) for Keras 3.

The package in four parts, each a sub-package (a part imports only the parts above it):

- ``keras_das.space``: the search space: candidate ops (``primitives``), ``MixedOp`` and its
  relaxations, the DARTS cells and supernet (per-edge and fused), genotypes and their
  derivation, architecture parameters.
- ``keras_das.engine``: the bilevel optimisation: ``SearchModel`` (``fit`` runs the
  search), the architects (first order, second order, exact), DARTS's updates and
  schedules, the remedies for collapse and the discretisation gap, DARTS-PT's selection.
- ``keras_das.discrete``: the discrete side: the network a genotype describes,
  ``discretize`` for any Keras model with MixedOps, export for TF Serving and TFLite.
- ``keras_das.runs``: what the binaries run: a config in, data, strategies, checkpoints,
  callbacks, reports, a workdir out.

The binaries are ``python -m keras_das.search``, ``keras_das.train`` and ``keras_das.export``.
"""

from keras_das.discrete.discrete_network import DiscreteNetwork
from keras_das.discrete.discretize import discretize
from keras_das.discrete.serving import export
from keras_das.engine import remedies
from keras_das.engine import schedules
from keras_das.engine.search_model import SearchModel
from keras_das.engine.search_model import pair_datasets
from keras_das.runs import plot
from keras_das.space import latency
from keras_das.space import primitives
from keras_das.space import relaxations
from keras_das.space.fused_cell import FusedSearchCell
from keras_das.space.genotype import DARTS_V1
from keras_das.space.genotype import DARTS_V2
from keras_das.space.genotype import GENOTYPES
from keras_das.space.genotype import Genotype
from keras_das.space.genotype import derive_genotype
from keras_das.space.mixed_op import MixedOp
from keras_das.space.primitives import DARTS_OPS
from keras_das.space.primitives import register_op
from keras_das.space.search_network import SearchCell
from keras_das.space.search_network import SearchNetwork
from keras_das.space.variables import arch_variables
from keras_das.space.variables import weight_variables

__version__ = "0.1.0"

"""Input pipelines for architecture search and retraining.

Any TFDS image-classification dataset works by name (``cifar10``, ``cifar100``, ``mnist``,
``fashion_mnist``, ...), ``synthetic`` is a built-in dataset that needs no download, and
a user's own source is named as ``"package.module:function"`` (see ``registry``).
Everything is driven by a ``data`` config section, ``default_config()``.

Modules: ``config`` (the section and its checks), ``source`` (``DatasetInfo``, what a
dataset gives the pipelines), ``registry`` (datasets by name), ``synthetic`` and
``tfds_source`` (the two kinds of dataset), ``statistics`` (per-channel mean and std),
``augment`` (crop, flip, normalisation, cutout), ``pipelines`` (``SearchData``,
``TrainData``: the tf.data streams).

Example:
    >>> search = data.SearchData(config.data, seed=2)
    >>> train_ds, val_ds = search.streams(initial_epoch=0, epochs=50)
    >>> search.steps_per_epoch
"""

from keras_das.runs.data.augment import CROP_PADDING
from keras_das.runs.data.config import default_config
from keras_das.runs.data.pipelines import SearchData
from keras_das.runs.data.pipelines import TrainData
from keras_das.runs.data.pipelines import search_datasets
from keras_das.runs.data.pipelines import train_datasets
from keras_das.runs.data.registry import get_info
from keras_das.runs.data.source import DatasetInfo
from keras_das.runs.data.source import Source
from keras_das.runs.data.statistics import CACHE_DIR_ENV
from keras_das.runs.data.statistics import KNOWN_STATS
from keras_das.runs.data.statistics import STATS_SAMPLE_SIZE
from keras_das.runs.data.synthetic import SYNTHETIC
from keras_das.runs.data.synthetic import SYNTHETIC_DISPLACEMENTS
from keras_das.runs.data.synthetic import SYNTHETIC_IMAGE_SHAPE
from keras_das.runs.data.synthetic import SYNTHETIC_NUM_TEST
from keras_das.runs.data.synthetic import SYNTHETIC_NUM_TRAIN
from keras_das.runs.data.synthetic import synthetic_images

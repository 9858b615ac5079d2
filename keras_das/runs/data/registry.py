"""Datasets by name: the built-in ``synthetic`` one, any TFDS image classification, and a
user's own source.

``data.name`` is ``"synthetic"``, a TFDS name (``"cifar10"``, ``"mnist"``, ...), or a
function of the user's, ``"package.module:function"`` or ``"path/to/file.py:function"``
(``keras_das.runs.plugins``), called with the ``data`` config and returning a ``Source``:
uint8 images and int32 labels of one shape per example (a class, or a class per pixel),
for the pipelines to split, shuffle, batch and normalise as any other dataset.
"""

from __future__ import annotations

from typing import Any

from keras_das.runs import plugins
from keras_das.runs.data import config
from keras_das.runs.data import synthetic
from keras_das.runs.data import tfds_source
from keras_das.runs.data.source import DatasetInfo
from keras_das.runs.data.source import Source

# Built-in sources by name; every other name is looked up in TFDS.
SOURCES = {synthetic.SYNTHETIC: synthetic.open_source}


def open_source(data_config: Any) -> Source:
    """Opens the dataset a ``data`` config names (preparing a TFDS dataset if needed)."""
    if plugins.is_reference(data_config.name):
        return _user_source(data_config)
    return SOURCES.get(data_config.name, tfds_source.open_source)(data_config)


def _user_source(data_config: Any) -> Source:
    make_source = plugins.load_function(data_config.name, "data.name")
    source = make_source(data_config)
    if not isinstance(source, Source) or not isinstance(source.info, DatasetInfo):
        raise ValueError(
            f"config.data.name={data_config.name!r} must return a keras_das.runs.data.Source "
            f"(a DatasetInfo and a read function), got {type(source).__name__}"
        )
    return source


def get_info(data_config: Any) -> DatasetInfo:
    """Describes the dataset a data config names, preparing it if needed.

    A TFDS dataset that is not prepared in ``data_dir`` is downloaded and prepared by TFDS.

    Args:
        data_config: the ``data`` config.

    Returns:
        The dataset's ``DatasetInfo``.

    Raises:
        ValueError: unknown dataset, a dataset that is not prepared and cannot be
            downloaded, not an image-classification dataset, or a bad config value.
    """
    config.check_config(data_config)
    return open_source(data_config).info

"""Datasets by name: the built-in ``synthetic`` one, and any TFDS image classification."""

from __future__ import annotations

from typing import Any

from keras_das.runs.data import config
from keras_das.runs.data import synthetic
from keras_das.runs.data import tfds_source
from keras_das.runs.data.source import DatasetInfo
from keras_das.runs.data.source import Source

# Built-in sources by name; every other name is looked up in TFDS.
SOURCES = {synthetic.SYNTHETIC: synthetic.open_source}


def open_source(data_config: Any) -> Source:
    """Opens the dataset a ``data`` config names (preparing a TFDS dataset if needed)."""
    return SOURCES.get(data_config.name, tfds_source.open_source)(data_config)


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

"""The ``data`` config section: its fields and defaults, and the checks of their values."""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from keras_das.runs import config_fields


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``data`` config section, with the DARTS search defaults on CIFAR-10.

    Args:
        **overrides: fields to change, e.g. ``batch_size=96, cutout=16``.

    Returns:
        A ConfigDict with every field the data package reads.
    """
    return config_fields.config_section(
        {
            "name": "cifar10",  # "synthetic" or a TFDS image-classification dataset
            "data_dir": config_dict.placeholder(str),  # None: the TFDS default
            "train_portion": 0.5,  # share of the train split that is search-train
            "augment": True,  # random crop (4-pixel zero padding) and horizontal flip
            "cutout": 0,  # side of the cutout square; 0 = off
            "batch_size": 64,  # global, over all replicas
            "num_examples": config_dict.placeholder(int),  # None: the whole train split
            "num_test_examples": config_dict.placeholder(int),  # None: the whole test split
            "synthetic_seed": 0,  # seeds the images of the "synthetic" dataset
        },
        **overrides,
    )


def check_config(data_config: Any) -> None:
    """Raises ValueError for a value of the ``data`` section that no dataset accepts."""
    portion = data_config.train_portion
    if not 0.0 < portion < 1.0:
        raise ValueError(f"data.train_portion must be in (0, 1), got {portion!r}")
    cutout = data_config.cutout
    if not isinstance(cutout, int) or cutout < 0:
        raise ValueError(f"data.cutout must be an int >= 0 (0 = off), got {cutout!r}")
    for field in ("num_examples", "num_test_examples"):
        value = data_config[field]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"data.{field} must be None (all) or an int >= 1, got {value!r}")

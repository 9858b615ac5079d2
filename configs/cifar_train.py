"""Retraining a genotype from scratch on CIFAR-10 with the DARTS paper's recipe.

Run (``genotype`` is a name such as DARTS_V2 or the genotype.json a search wrote; or
``--config.model.keras_file=DIR/chosen.keras``, the model a search of your own model chose):

    python -m keras_das.train --config=configs/cifar_train.py \\
        --config.genotype=DIR/genotype.json --workdir=/tmp/train
    python -m keras_das.train --config=configs/cifar_train.py:smoke --workdir=/tmp/smoke

Presets:
    default: the paper (train.py defaults with --auxiliary --cutout): 20 cells of 36
        channels, 600 epochs, batch 96, auxiliary head, cutout 16, drop-path 0.2.
    smoke: the built-in ``synthetic`` dataset (no download), 5 cells of 8 channels,
        1000 training and 500 test examples, 2 epochs.
    cifar_smoke: the same on CIFAR-10, from TFDS's data dir (``TFDS_DATA_DIR``, else
        ~/tensorflow_datasets; or set ``data.data_dir``).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from keras_das.runs import data
from keras_das.runs import distribution

PRESETS = ("default", "smoke", "cifar_smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The retrain config of a preset (see the module docstring); None means default."""
    preset = arg or "default"
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; expected one of {list(PRESETS)}")

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.deterministic = False  # tf.config.experimental.enable_op_determinism()
    config.epochs = 600
    config.genotype = "DARTS_V2"  # a name in keras_das.GENOTYPES or a genotype.json path
    config.jit_compile = False

    config.data = data.default_config(batch_size=96, cutout=16)
    config.model = ml_collections.ConfigDict(
        {
            "channels": 36,
            "num_cells": 20,
            "auxiliary": True,
            "auxiliary_weight": 0.4,
            "drop_path": 0.2,  # final rate, ramped linearly with the epochs
            "stem_multiplier": 3,
            # Instead of config.genotype: the architecture of a .keras model (the
            # chosen.keras of a search with model.builder), retrained with fresh weights.
            "keras_file": config_dict.placeholder(str),
        }
    )
    # SGD with momentum, lr cosine-annealed to lr_min over the epochs.
    config.optimizer = ml_collections.ConfigDict(
        {"lr": 0.025, "lr_min": 0.0, "momentum": 0.9, "weight_decay": 3e-4, "grad_clip": 5.0}
    )
    config.distribution = distribution.default_config()

    # The final network as a TF Serving SavedModel (workdir/export/<version>/) and TFLite.
    config.export = ml_collections.ConfigDict({"enabled": True, "tflite": True})

    if preset in ("smoke", "cifar_smoke"):
        config.epochs = 2
        config.data.batch_size = 32
        config.data.num_examples = 1000
        config.data.num_test_examples = 500
        config.model.channels = 8
        config.model.num_cells = 5
    if preset == "smoke":
        config.data.name = data.SYNTHETIC
    return config

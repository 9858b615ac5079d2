"""Architecture search on CIFAR-10 with the DARTS paper's settings, and smaller presets.

Run (the preset goes after the colon; any field can be overridden):

    python -m keras_das.search --config=configs/cifar.py --workdir=/tmp/search
    python -m keras_das.search --config=configs/cifar.py:smoke --workdir=/tmp/smoke
    python -m keras_das.search --config=configs/cifar.py:cifar_smoke --workdir=/tmp/smoke \\
        --config.data.num_examples=2000

Presets:
    default: the paper (train_search.py defaults): 8 cells of 16 channels, 50 epochs,
        batch 64, CIFAR-10's train split halved into search-train and search-val.
    smoke: the built-in ``synthetic`` dataset (no download), 5 cells of 8 channels,
        1000 examples, 3 epochs: an end-to-end run in minutes on a CPU.
    cifar_smoke: the same on the first 1000 CIFAR-10 training images, read from the shared
        copy in ../shared/tfds when there is one (else from the TFDS default data dir).
"""

from __future__ import annotations

import ml_collections

from keras_das import data
from keras_das.ops import DARTS_OPS

PRESETS = ("default", "smoke", "cifar_smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The search config of a preset (see the module docstring); None means default."""
    preset = arg or "default"
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; expected one of {list(PRESETS)}")

    config = ml_collections.ConfigDict()
    config.seed = 2
    config.deterministic = False  # tf.config.experimental.enable_op_determinism()
    config.epochs = 50
    config.jit_compile = False
    config.steps_per_execution = 1
    config.checkpoint_every_epochs = 1

    config.data = data.default_config(batch_size=64)
    config.model = ml_collections.ConfigDict(
        {
            "channels": 16,
            "num_cells": 8,
            "steps": 4,
            "multiplier": 4,
            "stem_multiplier": 3,
            "op_names": tuple(DARTS_OPS),
            "relaxation": "softmax",
            "temperature": 1.0,
        }
    )
    # Weights: SGD with momentum, lr cosine-annealed to lr_min over the epochs.
    config.optimizer = ml_collections.ConfigDict(
        {"lr": 0.025, "lr_min": 0.001, "momentum": 0.9, "weight_decay": 3e-4, "grad_clip": 5.0}
    )
    # Architecture parameters: Adam.
    config.arch = ml_collections.ConfigDict(
        {
            "architect": "first_order",  # first_order, second_order, exact
            "lr": 3e-4,
            "beta_1": 0.5,
            "beta_2": 0.999,
            "weight_decay": 1e-3,
        }
    )
    config.distribution = ml_collections.ConfigDict(
        {
            "strategy": "none",  # none, mirrored, multi_worker, tpu
            "tpu_address": "",
            "devices": (),  # mirrored: device names; () = every GPU, else the CPU
            "cpu_devices": 0,  # split the CPU into N logical devices (testing without GPUs)
        }
    )

    if preset in ("smoke", "cifar_smoke"):
        config.epochs = 3
        config.data.batch_size = 32
        config.data.num_examples = 1000
        config.model.channels = 8
        config.model.num_cells = 5
    if preset == "smoke":
        config.data.name = data.SYNTHETIC
    if preset == "cifar_smoke":
        config.data.data_dir = data.default_shared_tfds_dir()
    return config

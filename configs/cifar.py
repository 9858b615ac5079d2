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
    cifar_smoke: the same on the first 1000 CIFAR-10 training images, from TFDS's data dir
        (``TFDS_DATA_DIR``, else ~/tensorflow_datasets; or set ``data.data_dir``).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from keras_das.runs import data
from keras_das.runs import distribution
from keras_das.space.primitives import DARTS_OPS

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
            # Search your own Keras model instead of the DARTS cells: "package.module:fn" or
            # "path/to/file.py:fn", fn(info: DatasetInfo) -> keras.Model with MixedOps,
            # logits on the last axis (op_names ... temperature above are then unused).
            "builder": config_dict.placeholder(str),
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
            # Searches shorter than this many architecture steps (DARTS's 50 epochs x 391)
            # get lr x 19550 / steps, so that the alphas can move as far (0: off).
            "lr_reference_steps": 19550,
            "beta_1": 0.5,
            "beta_2": 0.999,
            "weight_decay": 1e-3,
        }
    )
    config.distribution = distribution.default_config()
    config.remedies = _remedies()
    # A user model's search (model.builder) exports its discretized model for TF Serving.
    config.export = ml_collections.ConfigDict({"enabled": True, "tflite": False})

    if preset in ("smoke", "cifar_smoke"):
        config.epochs = 3
        config.data.batch_size = 32
        config.data.num_examples = 1000
        config.model.channels = 8
        config.model.num_cells = 5
    if preset == "smoke":
        config.data.name = data.SYNTHETIC
        # The argmax: DARTS-PT's selection would measure each op's removal on 4 batches of
        # 32 images, too few here: with oneDNN's kernels it kept 5 convolutions of the normal
        # cell where the argmax of its alphas (entropy 1.72) had 7, and a rounding change
        # (not a change of method) had moved it there. The argmax is also 3.5 minutes faster.
        config.remedies.perturbation.enabled = False
    return config


def _remedies() -> ml_collections.ConfigDict:
    """The ``remedies`` section: each remedy off (but DARTS-PT's selection, which the search
    quality study measured better, and the gap report), with its published setting once on."""
    # Remedies for collapse and the discretisation gap (keras_das.engine.remedies); each off by
    # default (but DARTS-PT's selection and the gap report), with its published setting once
    # switched on.
    return ml_collections.ConfigDict(
        {
            # Sparsity: L1 on the mixing weights (acts on sigmoid relaxations), and
            # FairDARTS's zero-one loss (weight 10, with model.relaxation="sigmoid").
            "l1": {"enabled": False, "weight": 0.1},
            "zero_one": {"enabled": False, "weight": 10.0},
            # Temperature annealing over the search: constant, linear or exponential
            # (GDAS: exponential 10 -> 0.1, SNAS: 1 -> 0.03).
            "temperature": {"schedule": "constant", "start": 1.0, "end": 1.0},
            # P-DARTS: at most max_skips skip connections in the derived normal cell.
            "skip_cap": {"enabled": False, "max_skips": 2},
            # Every input-to-output path of the normal cell passes min_param_ops
            # parameterised (non-skip, non-pool) ops.
            "param_paths": {"enabled": False, "min_param_ops": 1},
            # DARTS+: stop when the normal cell has max_skips skips, or the op ranking has
            # been stable for stable_epochs epochs (0: that criterion off).
            "early_stop": {"enabled": False, "max_skips": 2, "stable_epochs": 10},
            # DARTS-: an auxiliary skip connection scaled by beta, decaying linearly to 0.
            "aux_skip": {"enabled": False, "beta": 1.0},
            # PC-DARTS: warm-up epochs with the alphas frozen (15 in the paper) ...
            "warmup": {"enabled": False, "epochs": 15},
            # ... and partial channel connections: 1/k of the channels through the ops,
            # with edge normalisation.
            "partial_channels": {"enabled": False, "k": 4, "edge_normalization": True},
            # FBNet / ProxylessNAS: + weight * expected latency (ms, batch batch_size) with a
            # table measured here and cached, or a JSON table given in `table`.
            "latency": {"enabled": False, "weight": 0.01, "table": "", "batch_size": 1},
            # DARTS-PT's selection: each edge keeps the op whose removal raises the
            # supernet's validation loss most (on `batches` batches), not the largest alpha.
            # On by default: in benchmarks/search_quality.py's full study (real CIFAR-10)
            # its cells retrained to 0.5985 +- 0.0214 over 3 searches against the argmax's
            # 0.5809 +- 0.0151 and random cells' 0.5676 +- 0.0135 (10 draws). It costs ~200
            # supernet evaluations of `batches` batches at the end of a search.
            "perturbation": {"enabled": True, "batches": 4},
            # The discretisation-gap report at the end of the search.
            "gap_report": {"enabled": True, "recalibration_batches": 20},
        }
    )

"""The config files: fields the engine reads, presets, command-line overrides, typos."""

from __future__ import annotations

import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

from keras_das.runs import data
from keras_das.runs import distribution
from keras_das.space.primitives import DARTS_OPS

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SEARCH = os.path.join(CONFIGS, "cifar.py")
RETRAIN = os.path.join(CONFIGS, "cifar_train.py")

DATA = {
    "name": "cifar10",
    "data_dir": None,
    "train_portion": 0.5,
    "augment": True,
    "cutout": 0,
    "batch_size": 64,
    "num_examples": None,
    "num_test_examples": None,
    "synthetic_seed": 0,
}
DISTRIBUTION = {
    "strategy": "none",
    "tpu_address": "",
    "devices": (),
    "cpu_devices": 0,
    "inter_op_threads": -1,
    "intra_op_threads": -1,
    "cpu_allocator": "auto",
    "cpu_kernels": "auto",
}
# Every remedy off, each with its published setting for when it is switched on; by default
# run the gap report (a measurement, not a change to the search) and DARTS-PT's selection
# (measured better than the argmax: README, "How good is the search").
REMEDIES = {
    "l1": {"enabled": False, "weight": 0.1},
    "zero_one": {"enabled": False, "weight": 10.0},
    "temperature": {"schedule": "constant", "start": 1.0, "end": 1.0},
    "skip_cap": {"enabled": False, "max_skips": 2},
    "param_paths": {"enabled": False, "min_param_ops": 1},
    "early_stop": {"enabled": False, "max_skips": 2, "stable_epochs": 10},
    "aux_skip": {"enabled": False, "beta": 1.0},
    "warmup": {"enabled": False, "epochs": 15},
    "partial_channels": {"enabled": False, "k": 4, "edge_normalization": True},
    "latency": {"enabled": False, "weight": 0.01, "table": "", "batch_size": 1},
    "perturbation": {"enabled": True, "batches": 4},
    "gap_report": {"enabled": True, "recalibration_batches": 20},
}
# The DARTS paper's settings (REFERENCE.md), field by field.
SEARCH_DEFAULT = {
    "seed": 2,
    "deterministic": False,
    "epochs": 50,
    "jit_compile": False,
    "steps_per_execution": 1,
    "checkpoint_every_epochs": 1,
    "data": DATA,
    "model": {
        "channels": 16,
        "num_cells": 8,
        "steps": 4,
        "multiplier": 4,
        "stem_multiplier": 3,
        "op_names": DARTS_OPS,
        "relaxation": "softmax",
        "temperature": 1.0,
        "builder": None,  # the DARTS cells, not a user model
    },
    "optimizer": {
        "lr": 0.025,
        "lr_min": 0.001,
        "momentum": 0.9,
        "weight_decay": 3e-4,
        "grad_clip": 5.0,
    },
    "arch": {
        "architect": "first_order",
        "lr": 3e-4,
        "lr_reference_steps": 19550,
        "beta_1": 0.5,
        "beta_2": 0.999,
        "weight_decay": 1e-3,
    },
    "distribution": DISTRIBUTION,
    "remedies": REMEDIES,
    "export": {"enabled": True, "tflite": False},  # a user model's chosen network
}
RETRAIN_DEFAULT = {
    "seed": 0,
    "deterministic": False,
    "epochs": 600,
    "genotype": "DARTS_V2",
    "jit_compile": False,
    "data": {**DATA, "batch_size": 96, "cutout": 16},
    "model": {
        "channels": 36,
        "num_cells": 20,
        "auxiliary": True,
        "auxiliary_weight": 0.4,
        "drop_path": 0.2,
        "stem_multiplier": 3,
        "keras_file": None,  # the genotype, not a .keras architecture
    },
    "optimizer": {
        "lr": 0.025,
        "lr_min": 0.0,
        "momentum": 0.9,
        "weight_decay": 3e-4,
        "grad_clip": 5.0,
    },
    "distribution": DISTRIBUTION,
    "export": {"enabled": True, "tflite": True},
}
SMOKE = {
    "epochs",
    "data.batch_size",
    "data.num_examples",
    "model.channels",
    "model.num_cells",
}


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed(config, default):
    a, b = flatten(config.to_dict()), flatten(default.to_dict())
    assert a.keys() == b.keys()
    return {key for key in a if a[key] != b[key]}


def parse(*argv):
    """Parses a command line the way the binaries do (config_flags, locked)."""
    argv = ["binary", *argv]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("path, expected", [(SEARCH, SEARCH_DEFAULT), (RETRAIN, RETRAIN_DEFAULT)])
def test_default_is_the_paper(path, expected):
    config = load(path).get_config()
    assert config.to_dict() == expected
    assert parse(f"--config={path}").to_dict() == expected
    assert isinstance(config.data, type(data.default_config()))


@pytest.mark.parametrize("path", [SEARCH, RETRAIN])
def test_presets_differ_only_where_intended(path):
    module = load(path)
    default = module.get_config()
    retrain = path == RETRAIN
    smoke_fields = SMOKE | ({"data.num_test_examples"} if retrain else set())
    # The smoke search derives by argmax (see configs/cifar.py); cifar_smoke keeps DARTS-PT.
    argmax = set() if retrain else {"remedies.perturbation.enabled"}
    smoke = module.get_config("smoke")
    assert changed(smoke, default) == smoke_fields | {"data.name"} | argmax
    assert smoke.data.name == "synthetic" and smoke.data.num_examples == 1000
    assert smoke.epochs == (2 if retrain else 3)

    cifar_smoke = module.get_config("cifar_smoke")
    assert changed(cifar_smoke, default) == smoke_fields
    assert cifar_smoke.data.data_dir is None  # TFDS's own default (or TFDS_DATA_DIR)
    assert changed(cifar_smoke, smoke) == {"data.name"} | argmax


@pytest.mark.parametrize("path", [SEARCH, RETRAIN])
def test_smoke_data_section_is_what_the_data_module_reads(path):
    config = parse(f"--config={path}:smoke")
    info = data.get_info(config.data)
    assert (info.name, info.num_train) == ("synthetic", 1000)


def test_command_line_overrides():
    config = parse(
        f"--config={SEARCH}:cifar_smoke",
        "--config.data.data_dir=/data/tfds",
        "--config.data.num_examples=500",
        "--config.model.op_names=('none', 'skip_connect', 'sep_conv_3x3')",
        "--config.arch.architect=second_order",
    )
    assert config.data.data_dir == "/data/tfds"
    assert config.data.num_examples == 500
    assert config.model.op_names == ("none", "skip_connect", "sep_conv_3x3")
    assert config.arch.architect == "second_order"


def test_locked_config_rejects_typos():
    with pytest.raises(AttributeError, match='Did you mean "name" instead of "nmae"'):
        parse(f"--config={SEARCH}", "--config.data.nmae=cifar100")
    config = parse(f"--config={RETRAIN}")
    with pytest.raises(AttributeError, match="auxilary"):
        config.model.auxilary = False
    with pytest.raises(TypeError):
        config.data.num_examples = "all"  # a placeholder keeps its type


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"'smoek'.*\['default', 'smoke', 'cifar_smoke'\]"):
        load(SEARCH).get_config("smoek")


def test_default_data_config_rejects_typos():
    assert data.default_config(batch_size=96).batch_size == 96
    with pytest.raises(AttributeError, match='Did you mean "cutout"'):
        data.default_config(cut_out=16)


def test_default_distribution_config_is_one_device_and_rejects_typos():
    assert distribution.default_config().to_dict() == DISTRIBUTION
    config = distribution.default_config(strategy="mirrored", cpu_devices=2)
    assert (config.strategy, config.cpu_devices, config.devices) == ("mirrored", 2, ())
    with pytest.raises(AttributeError, match='Did you mean "strategy"'):
        distribution.default_config(stratgy="mirrored")


@pytest.mark.parametrize("path", [SEARCH, RETRAIN])
def test_config_files_take_their_sections_from_the_modules(path):
    config = load(path).get_config()
    assert isinstance(config.distribution, type(distribution.default_config()))
    assert config.distribution.to_dict() == distribution.default_config().to_dict()
    assert config.data.keys() == data.default_config().keys()

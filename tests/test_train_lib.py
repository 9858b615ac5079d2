"""The retrain binary end to end, and its bad inputs."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_das
from configs import cifar_train
from keras_das.runs import train_lib
from tests.binaries import run_binary
from tests.testing import needs_cifar10


def check_train_workdir(workdir, epochs, tflite=True):
    with open(os.path.join(workdir, "train_summary.json")) as f:
        summary = json.load(f)
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and np.isfinite(summary["test_loss"])
    assert summary["parameters"] > 0 and summary["flops"] > 2 * summary["parameters"]
    assert summary["latency_ms"] > 0 and summary["latency_batch_size"] == 1
    genotype = keras_das.Genotype.load(os.path.join(workdir, "genotype.json"))
    assert keras_das.Genotype.from_dict(summary["genotype"]) == genotype
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["epochs"] == epochs
    with open(os.path.join(workdir, "genotype.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    assert isinstance(model, keras_das.DiscreteNetwork) and model.genotype == genotype
    with open(os.path.join(workdir, "checkpoints", "latest.json")) as f:
        assert json.load(f)["epoch"] == epochs
    tags = set()
    for root, _, files in os.walk(os.path.join(workdir, "tensorboard")):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags.update(v.tag for v in event.summary.value)
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= tags
    export = summary["export"]  # a new version per run: TF Serving serves the newest
    assert os.path.dirname(export) == os.path.join(workdir, "export")
    loaded = tf.saved_model.load(export)
    images = np.zeros((2, 32, 32, 3), np.uint8)  # the smoke presets' image shape
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    assert outputs["classes"].shape == (2,)
    if tflite:
        assert os.path.exists(os.path.join(export, "model.tflite"))
    return summary


@pytest.mark.e2e
def test_train_binary_smoke_preset_with_a_searched_genotype(tmp_path):
    genotype = tmp_path / "genotype.json"
    keras_das.DARTS_V1.save(str(genotype))
    workdir = str(tmp_path / "train")
    run_binary(
        "keras_das.train",
        "--config=configs/cifar_train.py:smoke",
        f"--config.genotype={genotype}",
        f"--workdir={workdir}",
    )
    summary = check_train_workdir(workdir, cifar_train.get_config("smoke").epochs)
    assert summary["genotype"] == keras_das.DARTS_V1.to_dict()
    assert summary["auxiliary_parameters"] > 0


@pytest.mark.e2e
@needs_cifar10
def test_train_binary_on_real_cifar10_with_a_named_genotype(tmp_path):
    workdir = str(tmp_path / "train")
    run_binary(
        "keras_das.train",
        "--config=configs/cifar_train.py:cifar_smoke",
        "--config.genotype=DARTS_V2",
        f"--workdir={workdir}",
    )
    summary = check_train_workdir(workdir, cifar_train.get_config("cifar_smoke").epochs)
    assert (
        summary["num_test_examples"] == cifar_train.get_config("cifar_smoke").data.num_test_examples
    )


def _config(**changes):
    config = cifar_train.get_config("smoke")
    config.epochs = 1
    config.model.num_cells, config.model.channels = 3, 4
    config.data.num_examples, config.data.num_test_examples = 128, 64
    config.export.tflite = False  # the binary tests convert to TFLite; keep these quick
    for field, value in changes.items():
        section, _, name = field.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config


def test_genotype_file_naming_ops_outside_the_space(tmp_path):
    path = tmp_path / "genotype.json"
    bad = {**keras_das.DARTS_V2.to_dict(), "normal": [["sep_conv_7x7", 0]] * 8}
    path.write_text(json.dumps(bad))
    with pytest.raises(
        ValueError, match=r"config.genotype=.*uses op 'sep_conv_7x7'; expected one of"
    ):
        train_lib.run(_config(genotype=str(path)), str(tmp_path / "w"), verbose=0)


def test_malformed_genotype_file(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text('{"normal": [["sep_conv_3x3", 0]')
    with pytest.raises(ValueError, match=r"config.genotype=.*Malformed genotype file"):
        train_lib.run(_config(genotype=str(path)), str(tmp_path / "w"), verbose=0)


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "genotype",
            "DARTS_V9",
            r"Unknown genotype 'DARTS_V9'; expected a .json file, random:SEED or one of",
        ),
        ("model.drop_path", 1.5, r"config.model.drop_path must be in \[0, 1\), got 1.5"),
        ("distribution.strategy", "ps", r"Unknown distribution.strategy 'ps'"),
        ("distribution.inter_op_threads", -3, r"config.distribution.inter_op_threads: .* got -3"),
        ("model.num_cells", 0, r"config.model.num_cells must be a positive int, got 0"),
    ],
)
def test_bad_retrain_configs_fail_before_training(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_lib.run(_config(**{field: value}), str(tmp_path / "w"), verbose=0)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_retrain_resumes_after_the_last_checkpoint(tmp_path):
    workdir = str(tmp_path / "w")
    first = train_lib.run(_config(epochs=1), workdir, verbose=0)
    assert first["resumed_from_epoch"] == 0
    second = train_lib.run(_config(epochs=2), workdir, verbose=0)
    assert second["resumed_from_epoch"] == 1
    check_train_workdir(workdir, 2, tflite=False)

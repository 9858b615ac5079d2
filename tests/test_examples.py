"""The examples/ searches, end to end on tiny shapes, and the synthetic data they make."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from keras_das import MixedOp

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TINY = ["--epochs=1", "--finetune_epochs=1", "--batch_size=16", "--width=4"]


def load_example(name: str):
    """Imports ``examples/<name>.py`` (a script directory, not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, flags",
    [
        ("segmentation", ["--examples=64", "--image_size=16"]),
        ("sequence_classification", ["--examples=64", "--length=12", "--width=8"]),
        ("keypoint_regression", ["--examples=64", "--image_size=16"]),
    ],
)
def test_example_runs_end_to_end(name, flags, capsys):
    results = load_example(name).main(TINY + flags)

    model = results["model"]
    assert not [layer for layer in model._flatten_layers() if isinstance(layer, MixedOp)]
    assert results["chosen"] and all(isinstance(op, str) for op in results["chosen"].values())
    assert math.isfinite(results["score"]) and math.isfinite(results["baseline"])
    printed = capsys.readouterr().out
    assert "Held-out" in printed
    for mix, op in results["chosen"].items():
        assert f"{mix}" in printed and op in printed


def test_segmentation_masks_match_images():
    images, masks = load_example("segmentation").make_shapes(64, 24, np.random.default_rng(0))
    assert images.shape == (64, 24, 24, 1) and masks.shape == (64, 24, 24)
    assert set(np.unique(masks)) == {0, 1, 2}
    # Shapes are bright (>= 0.5 before noise of std 0.25), the background is 0.
    assert images[masks > 0].mean() > 0.5 > 0.1 > abs(images[masks == 0].mean())


def test_sequences_differ_only_in_order():
    example = load_example("sequence_classification")
    tokens, labels = example.make_sequences(500, 10, 8, np.random.default_rng(0))
    # One A and one B in every sequence, so counting tokens says nothing about the label.
    assert np.all(np.sum(tokens == example.TOKEN_A, axis=1) == 1)
    assert np.all(np.sum(tokens == example.TOKEN_B, axis=1) == 1)
    a_first = np.argmax(tokens == example.TOKEN_A, 1) < np.argmax(tokens == example.TOKEN_B, 1)
    np.testing.assert_array_equal(labels, a_first)
    assert 0.4 < labels.mean() < 0.6


def test_blob_targets_are_the_blob_centres():
    images, points = load_example("keypoint_regression").make_blobs(
        32, 20, np.random.default_rng(0)
    )
    assert images.shape == (32, 20, 20, 1) and points.shape == (32, 2)
    # The brightest pixel after smoothing out the noise lies at the target, to a pixel or two.
    smooth = sum(
        np.roll(images[..., 0], (dy, dx), (1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )
    flat = smooth.reshape(32, -1).argmax(-1)
    brightest = np.stack([flat % 20, flat // 20], -1) + 0.5
    assert np.median(np.linalg.norm(brightest - points * 20, axis=-1)) < 1.5


@pytest.mark.slow
def test_sequence_example_second_order():
    """An Embedding's gradient is sparse (IndexedSlices); the virtual step and its
    vector product need it dense (it crashed with "'IndexedSlices' object has no
    attribute '_id'" before the architect densified it)."""
    flags = TINY + ["--examples=64", "--length=12", "--width=8", "--architect=second_order"]
    result = load_example("sequence_classification").main(flags)
    assert np.isfinite(result["score"])


@pytest.mark.e2e
@pytest.mark.slow
def test_segmentation_through_the_binaries(tmp_path):
    """The segmentation example's docstring commands, on tiny sizes: its supernet searched by
    the search binary (model.builder, data.name), retrained by the train binary from
    chosen.keras, and both exports served per pixel by TensorFlow alone. The search runs
    under a MirroredStrategy of two CPU devices."""
    from tests.binaries import run_binary

    data_flags = (
        "--config.data.name=examples/segmentation.py:source",
        "--config.data.augment=False",
        "--config.data.num_examples=64",
        "--config.data.batch_size=16",
    )
    search_dir, train_dir = tmp_path / "search", tmp_path / "train"
    run_binary(
        "keras_das.search",
        "--config=configs/cifar.py:smoke",
        f"--workdir={search_dir}",
        "--config.model.builder=examples/segmentation.py:build",
        "--config.epochs=1",
        "--config.remedies.gap_report.recalibration_batches=1",
        "--config.distribution.strategy=mirrored",  # a batch of 16 split over 2 replicas
        "--config.distribution.cpu_devices=2",
        *data_flags,
    )
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert sorted(summary["chosen"]) == ["dec_full", "enc_full", "enc_half", "enc_quarter"]
    assert 0 <= summary["gap_report"]["derived_val_accuracy_inherited_weights"] <= 1
    run_binary(
        "keras_das.train",
        "--config=configs/cifar_train.py:smoke",
        f"--workdir={train_dir}",
        f"--config.model.keras_file={search_dir / 'chosen.keras'}",
        "--config.epochs=1",
        "--config.data.num_test_examples=16",
        "--config.data.cutout=0",
        "--config.export.tflite=False",
        *data_flags,
    )
    trained = json.loads((train_dir / "train_summary.json").read_text())
    assert 0 <= trained["test_accuracy"] <= 1  # per pixel
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys\n"
        "sys.modules['keras_das'] = None\n"
        "import numpy as np, tensorflow as tf\n"
        "for i, path in enumerate(sys.argv[1:]):\n"
        "    serve = tf.saved_model.load(path).signatures['serving_default']\n"
        "    out = serve(images=tf.constant(np.load('images.npy')))\n"
        "    assert out['probabilities'].shape == (3, 32, 32, 3), out['probabilities'].shape\n"
        "    assert out['classes'].shape == (3, 32, 32), out['classes'].shape\n"
        "    np.testing.assert_allclose(tf.reduce_sum(out['probabilities'], -1), 1, atol=1e-5)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            script,
            str(search_dir / "export" / "1"),
            str(train_dir / "export" / "1"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]

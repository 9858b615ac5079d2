"""The search binary's flow on a user's own model (``model.builder``) and data
(``data.name="module:function"``), the retrain of its ``chosen.keras``, and the errors."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import cifar
from configs import cifar_train
from keras_das.runs import data
from keras_das.runs import experiment
from keras_das.runs import search_lib
from keras_das.runs import train_lib

FUNCTIONAL = "tests.user_models:functional"
SEGMENTATION = "examples/segmentation.py"


def user_config(builder=FUNCTIONAL, **changes):
    config = cifar.get_config("smoke")
    config.model.builder = builder
    config.data.num_examples, config.data.batch_size = 128, 16
    config.epochs = 2
    config.remedies.gap_report.recalibration_batches = 2
    config.remedies.perturbation.enabled = False  # the argmax; DARTS-PT: its own test
    for field, value in changes.items():
        section, _, name = field.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config


def softmax(x):
    e = np.exp(np.asarray(x) - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def tensorboard_tags(workdir):
    tags = set()
    for root, _, files in os.walk(os.path.join(workdir, "tensorboard")):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags.update(v.tag for v in event.summary.value)
    return tags


def run_without_keras_das(script: str, *args, cwd):
    """Runs ``script`` in a Python that cannot import keras_das (nor, with ``keras`` in
    ``blocked``, Keras)."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


BLOCK = "import sys\nsys.modules['keras_das'] = None\n"


@pytest.fixture(scope="module")
def functional_search(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("user_search"))
    summary = search_lib.run(user_config(), workdir, verbose=0)
    return workdir, summary


@pytest.mark.slow
def test_user_model_search_writes_its_workdir(functional_search):
    workdir, summary = functional_search
    listing = sorted(os.listdir(workdir))
    for name in (
        "alpha_history.json",
        "alphas",
        "checkpoints",
        "chosen.json",
        "chosen.keras",
        "config.json",
        "export",
        "gap_report.json",
        "search_summary.json",
        "tensorboard",
    ):
        assert name in listing, listing
    assert "genotype.json" not in listing
    assert sorted(os.listdir(os.path.join(workdir, "alphas"))) == ["block_1.png", "block_2.png"]
    # The choice is each MixedOp's argmax of softmax(alpha), recomputed here from the alphas.
    alphas = {path.split("/")[-2]: value for path, value in summary["alphas"].items()}
    with open(os.path.join(workdir, "chosen.json")) as f:
        chosen = json.load(f)
    assert sorted(chosen) == ["block_1", "block_2"]
    candidates = ("conv_3x3", "sep_conv_3x3", "max_pool_3x3")
    for name, op in chosen.items():
        weights = softmax(alphas[name])
        assert op == candidates[int(np.argmax(weights))]
        entropy = -np.sum(weights * np.log(weights))
        assert summary["mixing_entropy"][name] == pytest.approx(entropy, rel=1e-4)
    with open(os.path.join(workdir, "alpha_history.json")) as f:
        history = json.load(f)
    assert history["epochs"] == [0, 1]
    np.testing.assert_allclose(history["weights"]["block_1"][-1], softmax(alphas["block_1"]), 1e-5)
    tags = tensorboard_tags(workdir)
    for tag in ("epoch_loss", "epoch_arch_val_accuracy", "mixing_weights/block_2/sep_conv_3x3"):
        assert tag in tags, sorted(tags)
    report = summary["gap_report"]
    assert 0 <= report["derived_val_accuracy_inherited_weights"] <= 1
    assert report["gap"] == pytest.approx(
        report["supernet_val_accuracy"] - report["derived_val_accuracy_inherited_weights"]
    )
    assert summary["export"] == os.path.join(workdir, "export", "1")


@pytest.mark.slow
def test_chosen_model_loads_and_serves_without_keras_das(functional_search, tmp_path):
    workdir, _ = functional_search
    info = data.SearchData(user_config().data, 0).info
    images = np.random.default_rng(0).integers(0, 256, (6, *info.image_shape), dtype=np.uint8)
    x = (images / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "images.npy", images)
    script = BLOCK + (
        "import keras, numpy as np, tensorflow as tf\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "assert not [l for l in model.layers if 'keras_das' in type(l).__module__]\n"
        "np.save('keras_out.npy', model.predict(np.load('x.npy'), verbose=0))\n"
        "serve = tf.saved_model.load(sys.argv[2]).signatures['serving_default']\n"
        "np.save('served.npy', serve(images=tf.constant(np.load('images.npy')))['probabilities'])\n"
    )
    run_without_keras_das(
        script,
        os.path.join(workdir, "chosen.keras"),
        os.path.join(workdir, "export", "1"),
        cwd=tmp_path,
    )
    expected = keras.models.load_model(os.path.join(workdir, "chosen.keras"))(x, training=False)
    np.testing.assert_allclose(np.load(tmp_path / "keras_out.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), softmax(expected), atol=1e-5)


@pytest.mark.slow
def test_user_model_search_resumes_finished(functional_search):
    workdir, summary = functional_search
    again = search_lib.run(user_config(), workdir, verbose=0)
    assert again["resumed_from_epoch"] == 2 and "final_metrics" not in again
    assert again["chosen"] == summary["chosen"]
    np.testing.assert_allclose(
        again["gap_report"]["supernet_val_accuracy"],
        summary["gap_report"]["supernet_val_accuracy"],
    )


@pytest.mark.slow
def test_retrain_of_chosen_keras_starts_from_fresh_weights(functional_search, tmp_path):
    workdir, _ = functional_search
    chosen_path = os.path.join(workdir, "chosen.keras")
    config = cifar_train.get_config("smoke")
    config.model.keras_file = chosen_path
    config.data.num_examples, config.data.num_test_examples = 128, 64
    config.data.batch_size, config.epochs, config.export.tflite = 16, 1, False
    retrain_dir = str(tmp_path / "retrain")
    summary = train_lib.run(config, retrain_dir, verbose=0)
    assert summary["keras_file"] == os.path.abspath(chosen_path) and "genotype" not in summary
    assert 0 <= summary["test_accuracy"] <= 1
    chosen = keras.models.load_model(chosen_path)
    retrained = keras.models.load_model(os.path.join(retrain_dir, "model.keras"))
    assert [type(layer).__name__ for layer in retrained.layers] == [
        type(layer).__name__ for layer in chosen.layers
    ]
    kernels = [
        (a, b)
        for a, b in zip(chosen.weights, retrained.weights)
        if a.path.endswith("kernel") and a.shape == b.shape
    ]
    assert kernels and not any(np.allclose(a, b) for a, b in kernels)
    assert sorted(os.listdir(os.path.join(retrain_dir, "export"))) == ["1"]


@pytest.mark.slow
def test_subclassed_user_model(tmp_path):
    config = user_config("tests.user_models:subclassed", epochs=1)
    config.export.enabled = False
    summary = search_lib.run(config, str(tmp_path), verbose=0)
    assert list(summary["chosen"]) == ["block"]
    assert summary["gap_report"]["bn_recalibration_batches"] == 2  # its batch norm
    model = keras.models.load_model(tmp_path / "chosen.keras")
    assert isinstance(model, keras.Model) and model.inputs  # traced into a Functional model
    assert "export" not in os.listdir(tmp_path)


@pytest.mark.parametrize(
    "builder, message",
    [
        ("tests.user_models", "must name a function as 'package.module:function'"),
        ("tests.no_such_module:build", "cannot import 'tests.no_such_module'"),
        ("examples/no_such_file.py:build", "cannot import 'examples/no_such_file.py'"),
        (
            "tests.user_models:missing",
            "has no 'missing'; its functions: ['any_size', 'functional', ",
        ),
        ("tests.user_models:CANDIDATES", "has a non-callable 'CANDIDATES'"),
    ],
)
def test_bad_builder_is_refused_before_anything_runs(builder, message, tmp_path):
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match="config.model.builder=") as error:
        search_lib.run(user_config(builder), str(workdir), verbose=0)
    assert message in str(error.value)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "builder, message",
    [
        ("tests.user_models:not_a_model", "must return a keras.Model with MixedOps, got str"),
        ("tests.user_models:wrong_input", "with inputs [(None, 8, 8, 1)]; the dataset"),
    ],
)
def test_builder_returning_the_wrong_model(builder, message, tmp_path):
    with pytest.raises(ValueError, match="config.model.builder=") as error:
        search_lib.run(user_config(builder), str(tmp_path), verbose=0)
    assert message in str(error.value)


def test_darts_only_remedies_are_refused_for_a_user_model(tmp_path):
    config = user_config()
    config.remedies.skip_cap.enabled = True
    with pytest.raises(ValueError, match=r"config.remedies.skip_cap acts on DARTS cells"):
        search_lib.run(config, str(tmp_path / "w"), verbose=0)
    assert not (tmp_path / "w").exists()


def test_user_data_source(tmp_path):
    config = data.default_config(name=f"{SEGMENTATION}:source", augment=False, batch_size=8)
    config.num_examples, config.num_test_examples = 32, 16
    search = data.SearchData(config, seed=0)
    assert search.info.label_shape == (32, 32) and search.info.num_classes == 3
    x, y = next(iter(search.streams()[0]))
    assert x.shape == (8, 32, 32, 1) and x.dtype == tf.float32
    assert y.shape == (8, 32, 32) and set(np.unique(y)) <= {0, 1, 2}
    # Normalised with the source's own statistics.
    assert abs(float(tf.reduce_mean(x))) < 0.5

    config.augment = True
    with pytest.raises(ValueError, match=r"data.augment=True crops and flips the images"):
        data.SearchData(config, seed=0)
    config.name = "tests.user_models:not_a_source"
    with pytest.raises(ValueError, match=r"must return a keras_das.runs.data.Source.*tuple"):
        data.SearchData(config, seed=0)


def test_keras_file_must_exist(tmp_path):
    config = cifar_train.get_config("smoke")
    config.model.keras_file = str(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match=r"config.model.keras_file=.*must be an existing"):
        train_lib.run(config, str(tmp_path / "w"), verbose=0)


def test_run_export_without_the_tflite_files_tflite_cannot_convert(tmp_path):
    """A binary's export (Experiment.export) keeps the SavedModel when TFLite fails (FFT is
    no TFLite builtin) and says why, instead of failing the run after its training."""
    inputs = keras.Input((8, 8, 3))
    flat = keras.layers.Flatten()(inputs)
    real, _ = keras.ops.fft((flat, keras.ops.zeros_like(flat)))
    model = keras.Model(inputs, keras.layers.Dense(3)(real))
    config = cifar_train.get_config("smoke")
    assert config.export.tflite
    exp = experiment.Experiment(config, str(tmp_path), tf.distribute.get_strategy(), True)
    info = data.DatasetInfo("images", 3, (8, 8, 3), (0.5,) * 3, (0.25,) * 3, 10, 10)
    out = exp.export(model, info)
    assert out["export"] == str(tmp_path / "export" / "1")
    assert "FFT" in out["tflite_error"]
    assert sorted(os.listdir(out["export"])) == ["assets", "fingerprint.pb", "saved_model.pb",
                                                 "variables"]  # fmt: skip
    images = np.zeros((2, 8, 8, 3), np.uint8)
    served = tf.saved_model.load(out["export"]).signatures["serving_default"]
    assert served(images=tf.constant(images))["classes"].shape == (2,)


@pytest.mark.slow
def test_darts_pt_selection_on_a_user_model(tmp_path):
    """remedies.perturbation on a user model: each MixedOp keeps the candidate whose removal
    raises the validation loss most, checked here by taking each candidate out by hand
    (its alpha set to -inf, so softmax gives it no weight but does renormalise the rest:
    a different perturbation, so only the chosen candidates are compared)."""
    config = user_config(epochs=1)
    config.remedies.perturbation.enabled = True
    config.remedies.perturbation.batches = 2
    config.export.enabled = False
    summary = search_lib.run(config, str(tmp_path), verbose=0)
    assert sorted(summary["argmax_chosen"]) == sorted(summary["chosen"]) == ["block_1", "block_2"]
    assert summary["perturbation_selection_s"] > 0
    with open(tmp_path / "chosen.json") as f:
        assert json.load(f) == summary["chosen"]
    model = keras.models.load_model(tmp_path / "chosen.keras")
    names = [layer.name for layer in model.layers]
    assert "block_1" in names and "block_2" in names


def test_override_mixing_weights_inside_a_traced_function():
    """One trace serves every set of override weights; outside the block the alpha rules."""
    from keras_das import MixedOp
    from keras_das.space import mixed_op

    mix = MixedOp(["skip_connect", "avg_pool_3x3"], name="mix")
    x = tf.random.stateless_normal((2, 4, 4, 3), seed=(1, 2))
    mix(x)
    traces = []

    @tf.function
    def forward(weights):
        traces.append(1)
        with mixed_op.override_mixing_weights({mix: weights}):
            return mix(x)

    skip = forward(tf.constant([1.0, 0.0]))
    pool = forward(tf.constant([0.0, 1.0]))
    np.testing.assert_allclose(skip, x, atol=1e-6)
    assert not np.allclose(pool, x) and len(traces) == 1
    w = mix.get_mixing_weights()  # the alpha's (1e-3-scale noise around uniform)
    np.testing.assert_allclose(mix(x), w[0] * x + w[1] * pool, atol=1e-5)


@pytest.mark.slow
def test_a_model_of_any_image_size_is_searched_exported_and_retrained(tmp_path):
    """keras.Input((None, None, C)) fits the dataset; the export serves the dataset's size."""
    search_dir = tmp_path / "search"
    summary = search_lib.run(user_config("tests.user_models:any_size", epochs=1), str(search_dir))
    served = tf.saved_model.load(summary["export"]).signatures["serving_default"]
    _, spec = served.structured_input_signature
    assert spec["images"].shape.as_list() == [None, 32, 32, 3]
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert served(images=tf.constant(images))["probabilities"].shape == (2, 10)
    config = cifar_train.get_config("smoke")
    config.model.keras_file = str(search_dir / "chosen.keras")
    config.data.num_examples, config.data.num_test_examples = 64, 32
    config.data.batch_size, config.epochs, config.export.tflite = 16, 1, False
    trained = train_lib.run(config, str(tmp_path / "retrain"), verbose=0)
    assert 0 <= trained["test_accuracy"] <= 1

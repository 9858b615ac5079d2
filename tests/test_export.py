import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_das
from keras_das.discrete import serving as export_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_DIR = os.path.join(REPO, "..", "shared", "tfds")
MEAN = np.array(export_lib.CIFAR10_MEAN, "float32")
STD = np.array(export_lib.CIFAR10_STD, "float32")
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}

pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")

# The start of a script run by `python -I -c` that may import TensorFlow and NumPy but neither
# keras_das nor keras (the editable install would put keras_das on the path even under -I, so
# both are blocked outright).
TENSORFLOW_ALONE = (
    "import sys\n"
    "sys.modules['keras_das'] = None\n"
    "sys.modules['keras'] = None\n"
    "for name in ('keras_das', 'keras'):\n"
    "    try:\n"
    "        __import__(name)\n"
    "    except ImportError:\n"
    "        continue\n"
    "    raise SystemExit(name + ' is importable')\n"
    "import numpy as np\n"
    "import tensorflow as tf\n"
)


def _images(n, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype("uint8")


def _classifier(num_classes=5, seed=0):
    """Conv, batch norm with non-trivial moving statistics (inference mode shows), head."""
    inputs = keras.Input((8, 8, 3))
    h = layers.Conv2D(4, 3, padding="same")(inputs)
    bn = layers.BatchNormalization()
    h = layers.MaxPooling2D()(layers.ReLU()(bn(h)))
    outputs = layers.Dense(num_classes)(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype("float32"))
    return model


def _expected(model, images, mean=MEAN, std=STD):
    x = (images.astype("float32") / 255.0 - mean) / std
    return np.asarray(keras.ops.softmax(model(x, training=False)))


def _run(args, **kwargs):
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export with TFLite files, shared by the checks that only read it."""
    model = _classifier()
    path = keras_das.export(model, tmp_path_factory.mktemp("serving"))
    images = _images(16)
    return model, path, images, _expected(model, images)


def test_layout(exported):
    _, path, _, _ = exported
    assert os.path.basename(path) == "1"
    assert sorted(os.listdir(os.path.dirname(path))) == ["1"]
    for name in ("saved_model.pb", "variables", "model.tflite", "model_dynamic_range.tflite"):
        assert os.path.exists(os.path.join(path, name)), name


def test_served_by_tensorflow_alone(exported, tmp_path):
    _, path, images, expected = exported
    np.save(tmp_path / "images.npy", images)
    script = (
        TENSORFLOW_ALONE
        + "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = serve(images=tf.constant(np.load('images.npy')))\n"
        "np.save('probabilities.npy', out['probabilities'].numpy())\n"
        "np.save('classes.npy', out['classes'].numpy())\n"
        # Here, not in pytest: without the shape check this input aborted the process.
        "try:\n"
        "    serve(images=tf.zeros([8, 8, 3], tf.uint8))\n"
        "    raise SystemExit('a single image without a batch axis was accepted')\n"
        "except tf.errors.InvalidArgumentError as error:\n"
        "    assert 'not compatible with expected shape' in str(error), error\n"
    )
    _run([sys.executable, "-I", "-c", script, path], cwd=tmp_path)
    probabilities = np.load(tmp_path / "probabilities.npy")
    classes = np.load(tmp_path / "classes.npy")
    assert probabilities.dtype == np.float32 and probabilities.shape == (16, 5)
    assert classes.dtype == np.int64 and classes.shape == (16,)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(classes, expected.argmax(-1))


def test_saved_model_cli_show(exported):
    _, path, _, _ = exported
    out = _run([SAVED_MODEL_CLI, "show", "--all", "--dir", path]).stdout
    signature = out.split("signature_def['serving_default']:")[1].split("signature_def[")[0]
    images, outputs = signature.split(
        "The given SavedModel SignatureDef contains the following output"
    )
    assert re.search(
        r"inputs\['images'\] tensor_info:\s+dtype: DT_UINT8\s+shape: \(-1, 8, 8, 3\)", images
    )
    assert re.search(
        r"outputs\['probabilities'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 5\)", outputs
    )
    assert re.search(
        r"outputs\['classes'\] tensor_info:\s+dtype: DT_INT64\s+shape: \(-1\)", outputs
    )


def test_saved_model_cli_run(exported, tmp_path):
    _, path, images, expected = exported
    np.save(tmp_path / "images.npy", images)
    outdir = tmp_path / "out"
    _run(
        [
            SAVED_MODEL_CLI,
            "run",
            "--dir",
            path,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"images={tmp_path / 'images.npy'}",
            "--outdir",
            str(outdir),
        ]
    )
    np.testing.assert_array_equal(np.load(outdir / "classes.npy"), expected.argmax(-1))
    np.testing.assert_allclose(np.load(outdir / "probabilities.npy"), expected, atol=1e-5)


def _tflite(path, images):
    interpreter = tf.lite.Interpreter(model_path=path)
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["classes", "probabilities"]}
    }
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    return interpreter.get_signature_runner("serving_default")(images=images)


def test_tflite_agrees(exported):
    model, path, images, expected = exported
    out = _tflite(os.path.join(path, "model.tflite"), images)
    np.testing.assert_array_equal(out["classes"], expected.argmax(-1))
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    quantised = _tflite(os.path.join(path, "model_dynamic_range.tflite"), images)
    assert np.mean(quantised["classes"] == expected.argmax(-1)) >= 0.9
    # TFLite drops the shape check (its interpreter resizes inputs) but keeps the dtype.
    with pytest.raises(ValueError, match="expected type UINT8"):
        _tflite(os.path.join(path, "model.tflite"), images.astype("float32"))


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((2, 8, 8, 3), np.int32),
        np.zeros((2, 8, 8, 4), np.uint8),
        np.zeros((2, 9, 8, 3), np.uint8),
    ],
    ids=["float32", "int32", "channels", "height"],  # rank: see test_served_by_tensorflow_alone
)
def test_signature_rejects_wrong_dtype_or_shape(exported, images):
    _, path, _, _ = exported
    serve = tf.saved_model.load(path).signatures["serving_default"]
    assert serve(images=tf.constant(_images(1)))["classes"].shape == (1,)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"uint8|not compatible"):
        serve(images=tf.constant(images))


def test_versions(tmp_path):
    model = _classifier()
    assert keras_das.export(model, tmp_path, tflite=False) == str(tmp_path / "1")
    assert keras_das.export(model, tmp_path, tflite=False) == str(tmp_path / "2")
    os.makedirs(tmp_path / "10")
    os.makedirs(tmp_path / "latest")
    (tmp_path / "99").write_text("a file, not a version")
    assert export_lib.next_version(tmp_path) == 11
    assert keras_das.export(model, tmp_path, 7, tflite=False) == str(tmp_path / "7")
    assert sorted(os.listdir(tmp_path)) == ["1", "10", "2", "7", "99", "latest"]


def test_existing_version_is_refused(tmp_path):
    model = _classifier()
    keras_das.export(model, tmp_path, 3, tflite=False)
    with pytest.raises(FileExistsError, match=r"'.*3' already exists.*overwrite=True"):
        keras_das.export(model, tmp_path, 3, tflite=False)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_overwrite_replaces_the_version(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(export_lib, "_exchange", lambda a, b: False)
    old, new = _classifier(seed=0), _classifier(seed=1)
    path = keras_das.export(old, tmp_path, tflite=False)
    (tmp_path / "1" / "marker").write_text("old export")
    assert keras_das.export(new, tmp_path, 1, tflite=False, overwrite=True) == path
    assert sorted(os.listdir(tmp_path)) == ["1"]  # no staging or old copy left
    assert not os.path.exists(tmp_path / "1" / "marker")
    images = _images(4)
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"], _expected(new, images), atol=1e-5)
    assert np.abs(_expected(old, images) - _expected(new, images)).max() > 1e-3


class Exploding(keras.Model):  # no leading underscore: TF name scopes reject it
    """Built on [N, 8, 8, 3] images, then its call fails (as an incompatible model would)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(5)
        self.explode = False

    def call(self, inputs):
        if self.explode:
            raise RuntimeError("model call failed")
        return self.dense(keras.ops.mean(inputs, axis=(1, 2)))


@pytest.mark.parametrize("existing", [False, True])
def test_failed_model_call_leaves_nothing(tmp_path, existing):
    if existing:
        keras_das.export(_classifier(), tmp_path, 1, tflite=False)
    model = Exploding()
    model(np.zeros((1, 8, 8, 3), "float32"))
    model.explode = True
    with pytest.raises(RuntimeError, match="model call failed"):
        keras_das.export(model, tmp_path, 1, tflite=False, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == (["1"] if existing else [])


@pytest.mark.parametrize("existing", [False, True])
def test_failure_after_writing_leaves_nothing(tmp_path, monkeypatch, existing):
    if existing:
        keras_das.export(_classifier(), tmp_path, 1, tflite=False)
        (tmp_path / "1" / "marker").write_text("old export")
    written = []

    def failing_tflite(directory):
        written.extend(os.listdir(directory))
        (open(os.path.join(directory, "model.tflite"), "wb")).close()
        raise OSError("disk full")

    monkeypatch.setattr(export_lib, "_write_tflite", failing_tflite)
    with pytest.raises(OSError, match="disk full"):
        keras_das.export(_classifier(seed=1), tmp_path, 1, overwrite=True)
    assert "saved_model.pb" in written  # it failed midway
    assert sorted(os.listdir(tmp_path)) == (["1"] if existing else [])
    if existing:
        assert (tmp_path / "1" / "marker").read_text() == "old export"


def test_model_outputting_probabilities(tmp_path):
    inputs = keras.Input((8, 8, 3))
    logits = layers.Dense(4)(layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, layers.Softmax()(logits))
    path = keras_das.export(model, tmp_path, from_logits=False, mean=0.5, std=(0.25,), tflite=False)
    images = _images(6)
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    x = (images.astype("float32") / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(served["probabilities"], model(x), atol=1e-6)


def test_subclassed_model(tmp_path):
    model = Exploding()
    model(np.zeros((2, 8, 8, 3), "float32"))
    path = keras_das.export(model, tmp_path, tflite=False)
    images = _images(3)
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"], _expected(model, images), atol=1e-6)


def _segmenter(num_classes=3):
    """Per-pixel logits [N, 8, 8, classes], with batch norm in inference mode as above."""
    inputs = keras.Input((8, 8, 3))
    bn = layers.BatchNormalization()
    h = layers.ReLU()(bn(layers.Conv2D(4, 3, padding="same")(inputs)))
    h = layers.Conv2D(4, 3, padding="same", activation="relu")(h)
    model = keras.Model(inputs, layers.Conv2D(num_classes, 1)(h), name="segmenter")
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype("float32"))
    return model


def test_segmentation_model(tmp_path):
    model = _segmenter()
    path = keras_das.export(model, tmp_path)
    images = _images(4)
    x = (images.astype("float32") / 255.0 - MEAN) / STD
    logits = model.predict(x, verbose=0).astype("float64")
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)

    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    assert served["probabilities"].shape == (4, 8, 8, 3)
    assert served["classes"].dtype == tf.int64 and served["classes"].shape == (4, 8, 8)
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(served["classes"], expected.argmax(-1))
    out = _tflite(os.path.join(path, "model.tflite"), images)
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["classes"], expected.argmax(-1))
    quantised = _tflite(os.path.join(path, "model_dynamic_range.tflite"), images)
    assert quantised["classes"].shape == (4, 8, 8)
    assert np.mean(quantised["classes"] == expected.argmax(-1)) >= 0.9


def _sequence_model():
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    h = layers.Embedding(50, 8)(tokens)
    h = layers.Conv1D(8, 3, activation="relu")(h)
    return keras.Model(tokens, layers.Dense(4)(layers.GlobalAveragePooling1D()(h)))


def test_model_signature_served_by_tensorflow_alone(tmp_path):
    model = _sequence_model()
    path = keras_das.export(model, tmp_path / "serving", signature="model")
    tokens = np.random.default_rng(0).integers(0, 50, (6, 12)).astype("int32")
    np.save(tmp_path / "tokens.npy", tokens)
    script = (
        TENSORFLOW_ALONE + "import json\n"
        "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "args, kwargs = serve.structured_input_signature\n"
        "inputs = {k: [v.dtype.name, v.shape.as_list()] for k, v in kwargs.items()}\n"
        "json.dump({'args': len(args), 'inputs': inputs}, open('signature.json', 'w'))\n"
        "out = serve(tokens=tf.constant(np.load('tokens.npy')))\n"
        "np.savez('out.npz', **{k: v.numpy() for k, v in out.items()})\n"
    )
    _run([sys.executable, "-I", "-c", script, path], cwd=tmp_path)
    with open(tmp_path / "signature.json") as f:
        assert json.load(f) == {"args": 0, "inputs": {"tokens": ["int32", [None, 12]]}}
    out = np.load(tmp_path / "out.npz")
    assert list(out) == ["outputs"]
    np.testing.assert_allclose(out["outputs"], model.predict(tokens, verbose=0), atol=1e-5)

    runner = tf.lite.Interpreter(os.path.join(path, "model.tflite")).get_signature_runner()
    np.testing.assert_allclose(
        runner(tokens=tokens)["outputs"], model.predict(tokens, verbose=0), atol=1e-5
    )


def test_model_signature_names(tmp_path):
    """Inputs by their keras.Input names, in any structure; outputs by output or dict names."""
    image, size = keras.Input((8, 8, 3), name="image"), keras.Input((1,), name="size")
    pooled = layers.GlobalAveragePooling2D()(image)
    logits = layers.Dense(3, name="logits")(pooled)
    area = layers.Dense(1, name="area")(layers.Concatenate()([pooled, size]))
    by_list = keras.Model({"size": size, "image": image}, [logits, area])
    by_dict = keras.Model([image, size], {"kind": logits, "area": area})
    x = {"image": np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype("float32")}
    x["size"] = np.arange(5, dtype="float32")[:, None]
    expected = [np.asarray(y) for y in by_list.predict(x, verbose=0)]

    for model, keys in ((by_list, ["logits", "area"]), (by_dict, ["kind", "area"])):
        path = keras_das.export(model, tmp_path, signature="model", tflite=False)
        serve = tf.saved_model.load(path).signatures["serving_default"]
        assert sorted(serve.structured_input_signature[1]) == ["image", "size"]
        out = serve(**{k: tf.constant(v) for k, v in x.items()})
        assert sorted(out) == sorted(keys)
        for key, value in zip(keys, expected, strict=True):
            np.testing.assert_allclose(out[key], value, atol=1e-5)


def test_tflite_failure_is_reported(tmp_path):
    """FFT is no TFLite builtin: the export fails saying so, and works without TFLite."""
    inputs = keras.Input((8,))
    real, _ = keras.ops.fft((inputs, keras.ops.zeros_like(inputs)))
    model = keras.Model(inputs, layers.Dense(2)(real))
    with pytest.raises(RuntimeError, match=r"TFLite cannot convert.*tflite=False") as error:
        keras_das.export(model, tmp_path, signature="model")
    assert "FFT" in str(error.value.__cause__)
    assert os.listdir(tmp_path) == []
    keras_das.export(model, tmp_path, signature="model", tflite=False)
    assert os.listdir(tmp_path) == ["1"]


def _dense_model():
    inputs = keras.Input((10,))
    return keras.Model(inputs, layers.Dense(3)(inputs), name="tabular")


def _conv_model(shape=(8, 8, 3)):
    inputs = keras.Input(shape)
    return keras.Model(inputs, layers.Conv2D(2, 1)(inputs), name="no_head")


def _pooled_model():
    """Returns one number per image, [N]: no classes axis."""
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.ops.mean(inputs, axis=(1, 2, 3)), name="pooled")


def _dict_model():
    inputs = keras.Input((8, 8, 3))
    logits = layers.Dense(2)(layers.GlobalAveragePooling2D()(inputs))
    return keras.Model(inputs, {"logits": logits}, name="dict_out")


@pytest.mark.parametrize(
    "make_model, kwargs, error, match",
    [
        (_dense_model, {}, ValueError, r"one image batch \[N, H, W, C\].*'tabular'.*\(None, 10\)"),
        (
            lambda: _conv_model((None, None, 3)),
            {},
            ValueError,
            r"known H, W and C.*\(None, None, None, 3\)",
        ),
        (Exploding, {}, ValueError, r"no known input shape"),
        (_classifier, {"mean": (0.5, 0.5)}, ValueError, r"mean needs 1 or 3 values.*\(0.5, 0.5\)"),
        (_classifier, {"std": (0.2, 0.0, 0.2)}, ValueError, r"std must be positive"),
        (_classifier, {"version": -1}, ValueError, r"non-negative int or None, got -1"),
        (_classifier, {"version": "2"}, ValueError, r"got '2'"),
        (_pooled_model, {}, ValueError, r"one tensor \[N, \.\.\., classes\].*'pooled'.*\(None,\)"),
        (_dict_model, {}, ValueError, r"one tensor \[N, \.\.\., classes\].*'dict_out'.*'logits'"),
        (_classifier, {"signature": "text"}, ValueError, r"'text'.*\['image', 'model'\]"),
        (
            _classifier,
            {"signature": "model", "mean": 0.5},
            ValueError,
            r"apply to signature='image'",
        ),
        (
            _classifier,
            {"signature": "model", "from_logits": False},
            ValueError,
            r"apply to signature='image'",
        ),
        (Exploding, {"signature": "model"}, ValueError, r"Functional or Sequential.*'exploding'"),
    ],
)
def test_bad_inputs(tmp_path, make_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_das.export(make_model(), tmp_path, tflite=False, **kwargs)
    assert os.listdir(tmp_path) == []


def test_two_inputs_are_refused(tmp_path):
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    model = keras.Model([a, b], layers.Dense(2)(layers.GlobalAveragePooling2D()(a + b)))
    with pytest.raises(
        ValueError, match=r"one image batch.*\[\(None, 8, 8, 3\), \(None, 8, 8, 3\)\]"
    ):
        keras_das.export(model, tmp_path)


def _binary_command(model, tmp_path, *flags):
    """Saves ``model`` and returns the command exporting it to ``tmp_path / "serving"``."""
    model.save(tmp_path / "model.keras")
    return [
        sys.executable,
        "-m",
        "keras_das.export",
        f"--model={tmp_path / 'model.keras'}",
        f"--export_dir={tmp_path / 'serving'}",
        *flags,
    ]


@pytest.mark.e2e
def test_binary(tmp_path):
    model = _classifier()
    base = tmp_path / "serving"
    command = _binary_command(
        model, tmp_path, "--version=3", "--mean=0.5", "--std=0.25,0.25,0.25", "--notflite"
    )
    _run(command, cwd=REPO)
    assert sorted(os.listdir(base / "3")) == [
        "assets",
        "fingerprint.pb",
        "saved_model.pb",
        "variables",
    ]
    images = _images(4)
    served = tf.saved_model.load(str(base / "3")).signatures["serving_default"](
        images=tf.constant(images)
    )
    np.testing.assert_allclose(
        served["probabilities"], _expected(model, images, mean=0.5, std=0.25), atol=1e-5
    )
    again = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode != 0
    assert "already exists" in again.stderr and "--overwrite" in again.stderr


@pytest.mark.e2e
def test_binary_model_signature(tmp_path):
    model = _sequence_model()
    command = _binary_command(model, tmp_path, "--signature=model", "--notflite")
    _run(command, cwd=REPO)
    tokens = np.random.default_rng(0).integers(0, 50, (3, 12)).astype("int32")
    served = tf.saved_model.load(str(tmp_path / "serving" / "1")).signatures["serving_default"](
        tokens=tf.constant(tokens)
    )
    np.testing.assert_allclose(served["outputs"], model.predict(tokens, verbose=0), atol=1e-5)
    bad = subprocess.run(
        [*command, "--signature=text"], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "value should be one of <image|model>" in bad.stderr


@pytest.mark.slow
def test_tflite_on_cifar10(tmp_path):
    """A tiny DARTS_V2 network trained for a few steps on real CIFAR-10, served by TFLite."""
    if not os.path.isdir(os.path.join(CIFAR10_DIR, "cifar10")):
        pytest.skip(f"CIFAR-10 is not prepared at {os.path.abspath(CIFAR10_DIR)}")
    import tensorflow_datasets as tfds

    def load(split):
        data = tfds.load(
            "cifar10", data_dir=CIFAR10_DIR, split=split, as_supervised=True, batch_size=-1
        )
        return tuple(np.asarray(t) for t in tfds.as_numpy(data))

    train_x, train_y = load("train[:2560]")
    test_x, test_y = load("test[:1000]")
    model = keras_das.DiscreteNetwork(
        keras_das.DARTS_V2, num_classes=10, channels=8, num_cells=3, seed=0
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit((train_x / 255.0 - MEAN) / STD, train_y, batch_size=64, epochs=1, verbose=0)
    expected = _expected(model, test_x)

    path = keras_das.export(model, tmp_path)
    float_out = _tflite(os.path.join(path, "model.tflite"), test_x)
    quant_out = _tflite(os.path.join(path, "model_dynamic_range.tflite"), test_x)
    keras_classes = expected.argmax(-1)
    agreement = np.mean(quant_out["classes"] == keras_classes)
    top2 = np.sort(expected, axis=-1)[:, -2:]
    print(
        f"\nCIFAR-10 test[:1000]: keras accuracy {np.mean(keras_classes == test_y):.3f}, "
        f"float TFLite argmax agreement {np.mean(float_out['classes'] == keras_classes):.4f} "
        f"(max |dp| {np.abs(float_out['probabilities'] - expected).max():.2e}), "
        f"dynamic-range agreement {agreement:.4f} "
        f"(max |dp| {np.abs(quant_out['probabilities'] - expected).max():.2e}), "
        f"smallest top-2 gap {np.min(top2[:, 1] - top2[:, 0]):.2e}"
    )
    np.testing.assert_array_equal(float_out["classes"], keras_classes)
    np.testing.assert_allclose(float_out["probabilities"], expected, atol=1e-4)
    assert agreement >= 0.9

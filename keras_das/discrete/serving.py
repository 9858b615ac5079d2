"""Export a trained model for serving: a TF Serving SavedModel and TFLite files.

``export`` writes ``export_dir/<version>/`` in the layout TF Serving watches: a SavedModel
with a ``serving_default`` signature, plus ``model.tflite`` and ``model_dynamic_range.tflite``
with the same contract. The version directory appears complete or not at all.

Two signatures:

- ``"image"`` (default), for image models: takes raw ``uint8`` images, normalises them and
  returns ``probabilities`` and ``classes`` over the last axis of the model's output, so a
  classifier ``[N, classes]`` and a per-pixel model ``[N, H, W, classes]`` serve alike.
- ``"model"``, for any Functional or Sequential model: takes the model's own inputs and
  returns its outputs as they are.

Example:
    >>> keras_das.export(model, "/tmp/serving/darts")  # writes /tmp/serving/darts/1/
    >>> keras_das.export(text_model, "/tmp/serving/text", signature="model")

The command-line binary over it is ``python -m keras_das.export``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import keras
import tensorflow as tf

# CIFAR-10 training-set statistics of pixels / 255 (the DARTS normalisation).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SIGNATURES = ("image", "model")
SIGNATURE_KEY = "serving_default"
INPUT_NAME = "images"
PROBABILITIES = "probabilities"
CLASSES = "classes"
OUTPUTS = "outputs"  # the "model" signature's key for a model's single output
TFLITE_FLOAT = "model.tflite"
TFLITE_DYNAMIC_RANGE = "model_dynamic_range.tflite"


def export(
    model: keras.Model | str | os.PathLike,
    export_dir: str | os.PathLike,
    version: int | None = None,
    *,
    signature: str = "image",
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    from_logits: bool = True,
    tflite: bool = True,
    overwrite: bool = False,
) -> str:
    """Exports a model to ``export_dir/<version>/``.

    With ``signature="image"`` the SavedModel's ``serving_default`` signature takes
    ``images``, a ``uint8`` tensor ``[N, H, W, C]`` (any N), computes
    ``(images / 255 - mean) / std``, runs the model in inference mode and returns
    ``{"probabilities": float32 [N, ..., classes], "classes": int64 [N, ...]}``: the softmax
    and the argmax over the last axis of the model's output, which may have any rank from 2
    (``[N, classes]`` for a classifier, ``[N, H, W, classes]`` for segmentation).

    With ``signature="model"`` it takes the model's own inputs, one argument per Keras input,
    named by its ``keras.Input``'s name, with that input's dtype and shape (any N), runs the
    model in inference mode and returns its outputs unchanged: ``{"outputs": ...}`` for one
    output, the keys of a dict output, or the model's ``output_names`` for several outputs.
    Nothing is normalised, so ``mean``, ``std`` and ``from_logits`` are refused there.

    The TFLite files take and return the same (``model.tflite`` in float32,
    ``model_dynamic_range.tflite`` with weights quantised to 8 bits), but the TFLite
    interpreter does not check input shapes. A model with ops TFLite's builtin op set lacks
    fails the export with an error saying so; pass ``tflite=False`` to export it anyway.

    Everything is written to a hidden temporary directory in ``export_dir`` (TF Serving
    ignores names that are not numbers) and renamed into place at the end, so a failure
    leaves no partial version behind.

    Args:
        model: a Keras model, or the path of a saved ``.keras`` model. For ``"image"``: one
            image batch ``[N, H, W, C]`` in, one tensor ``[N, ..., classes]`` out. For
            ``"model"``: a Functional or Sequential model (a subclassed one has no Keras
            inputs to name the signature after).
        export_dir: the base directory TF Serving watches; created if missing.
        version: the version directory to write. Default: one more than the largest
            numeric version already in ``export_dir``, or 1.
        signature: ``"image"`` or ``"model"``, the ``serving_default`` signature described
            above.
        mean: ``"image"`` only: per-channel mean of pixels / 255 (one value, or one per
            channel). Default: CIFAR-10's.
        std: ``"image"`` only: per-channel standard deviation of pixels / 255 (positive).
            Default: CIFAR-10's.
        from_logits: ``"image"`` only: the model outputs logits (softmax applied in the
            signature); pass ``False`` for a model that already outputs probabilities.
        tflite: also write the two TFLite files.
        overwrite: replace an existing version directory (atomically where the OS can
            swap directories, as Linux can) instead of refusing.

    Returns:
        The path of the version directory.

    Raises:
        ValueError: ``signature`` is unknown; for ``"image"``: the model does not take one
            image batch with known height, width and channels, ``mean``/``std`` are
            invalid, or the model's output is not one tensor of rank 2 or more; for
            ``"model"``: the model has no Keras inputs, its outputs cannot be named, or
            ``mean``/``std``/``from_logits`` were given; ``version`` is invalid.
        FileExistsError: the version directory exists and ``overwrite`` is False.
        TFLiteConversionError: a ``RuntimeError``: TFLite cannot convert the model (the
            converter's error is chained); nothing is written.
    """
    if signature not in SIGNATURES:
        raise ValueError(f"Unknown signature {signature!r}; expected one of {list(SIGNATURES)}")
    if not isinstance(model, keras.Model):
        model = keras.models.load_model(model, compile=False)
    if signature == "image":
        serve, input_signature = _image_endpoint(model, mean, std, from_logits)
    else:
        if mean is not None or std is not None or not from_logits:
            raise ValueError(
                "mean, std and from_logits apply to signature='image' only; signature='model' "
                "passes the model's inputs and outputs through unchanged"
            )
        serve, input_signature = _model_endpoint(model)

    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 0
    ):
        raise ValueError(f"version must be a non-negative int or None, got {version!r}")
    export_dir = os.fspath(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    if version is None:
        version = next_version(export_dir)
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(
            f"Export version directory {target!r} already exists; choose another version "
            "or pass overwrite=True (--overwrite) to replace it"
        )

    archive = keras.export.ExportArchive()
    archive.track(model)
    # Traces the model, so an output the signature cannot serve is refused here.
    archive.add_endpoint(SIGNATURE_KEY, serve, input_signature=input_signature)
    staging = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    try:
        archive.write_out(staging, verbose=False)
        if tflite:
            _write_tflite(staging)
        _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def next_version(export_dir: str | os.PathLike) -> int:
    """One more than the largest numeric directory name in ``export_dir``, or 1."""
    versions = [
        int(name)
        for name in os.listdir(export_dir)
        if name.isascii() and name.isdigit() and os.path.isdir(os.path.join(export_dir, name))
    ]
    return max(versions, default=0) + 1


def _image_shape(model: keras.Model) -> tuple[int, int, int]:
    """``(H, W, C)`` of the model's single image input, or a ValueError."""
    inputs = getattr(model, "inputs", None)  # Functional and built Sequential models
    if inputs:
        shapes = [tuple(x.shape) for x in inputs]
    elif "input_shape" in (model.get_build_config() or {}):  # built subclassed models
        shapes = [model.get_build_config()["input_shape"]]
    else:
        raise ValueError(
            f"Model {model.name!r} has no known input shape; build it on an image batch "
            "[N, H, W, C] first (or export a saved .keras model)"
        )
    shape = shapes[0] if len(shapes) == 1 else shapes
    if (
        len(shapes) != 1
        or not isinstance(shape, list | tuple)
        or len(shape) != 4
        or not all(isinstance(d, int) for d in shape[1:])
    ):
        raise ValueError(
            "export expects a model taking one image batch [N, H, W, C] with known H, W "
            f"and C; model {model.name!r} takes inputs of shape {shape}"
        )
    return tuple(shape[1:])


def _per_channel(name: str, values, channels: int) -> tuple[float, ...]:
    values = (values,) if isinstance(values, int | float) else tuple(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(
            f"{name} needs 1 or {channels} values (one per input channel), got {values!r}"
        )
    return tuple(float(v) for v in values)


def _image_endpoint(model, mean, std, from_logits):
    """The ``"image"`` signature's function and its input signature."""
    image_shape = _image_shape(model)
    channels = image_shape[-1]
    mean = _per_channel("mean", CIFAR10_MEAN if mean is None else mean, channels)
    std = _per_channel("std", CIFAR10_STD if std is None else std, channels)
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std!r}")
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)

    def serve(images):
        # A signature checks dtypes but not shapes; a wrong rank would reach the convolutions
        # (on CPU, oneDNN then aborts the process instead of raising).
        images = tf.ensure_shape(images, [None, *image_shape])
        x = (tf.cast(images, tf.float32) / 255.0 - mean) / std
        outputs = model(x, training=False)
        if not tf.is_tensor(outputs) or outputs.shape.rank is None or outputs.shape.rank < 2:
            raise ValueError(
                "signature='image' expects a model returning one tensor [N, ..., classes] "
                f"(rank 2 or more, classes on the last axis); model {model.name!r} returns "
                f"{outputs!r}. signature='model' serves other outputs as they are"
            )
        outputs = tf.cast(outputs, tf.float32)
        probabilities = tf.nn.softmax(outputs, axis=-1) if from_logits else outputs
        return {
            PROBABILITIES: probabilities,
            CLASSES: tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    return serve, [tf.TensorSpec([None, *image_shape], tf.uint8, name=INPUT_NAME)]


def _model_endpoint(model):
    """The ``"model"`` signature's function and its input signature."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"signature='model' needs a Functional or Sequential model; model {model.name!r} "
            "has no Keras inputs to name the signature's arguments after (wrap it: "
            "keras.Model(inputs, model(inputs)))"
        )
    # An unnamed keras.Input's tensor is named by a counter ("keras_tensor_3") until the
    # model is saved and reloaded; its InputLayer's name is the one a .keras file keeps.
    names = [x._keras_history.operation.name for x in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"Model {model.name!r} has inputs with the same name: {names}")
    specs = [
        tf.TensorSpec([None, *x.shape[1:]], x.dtype, name=name)
        for x, name in zip(inputs, names, strict=True)
    ]
    # A Sequential model has one input and no input structure until it is called.
    structure = inputs[0] if isinstance(model, keras.Sequential) else model.input

    def serve(*args):
        # As in the image signature: shapes are not checked by the signature itself.
        args = [tf.ensure_shape(x, spec.shape) for x, spec in zip(args, specs, strict=True)]
        outputs = model(keras.tree.pack_sequence_as(structure, args), training=False)
        return _named_outputs(model, outputs)

    return serve, specs


def _named_outputs(model, outputs) -> dict:
    """The model's outputs keyed as the ``"model"`` signature returns them."""
    if isinstance(outputs, dict):
        named = dict(outputs)
    else:
        flat = keras.tree.flatten(outputs)
        names = [OUTPUTS] if len(flat) == 1 else list(getattr(model, "output_names", []))
        if len(names) != len(flat) or len(set(names)) != len(names):
            raise ValueError(
                f"Cannot name the {len(flat)} outputs of model {model.name!r} (output names "
                f"{names}); return a dict of tensors to name them"
            )
        named = dict(zip(names, flat, strict=True))
    if not all(isinstance(k, str) and tf.is_tensor(v) for k, v in named.items()):
        raise ValueError(
            f"signature='model' expects a tensor, a list of tensors or a flat dict of them "
            f"keyed by strings; model {model.name!r} returns {outputs!r}"
        )
    return named


class TFLiteConversionError(RuntimeError):
    """TFLite cannot convert the exported signature (the converter's error is chained)."""


def _write_tflite(saved_model_dir: str) -> None:
    for filename, optimizations in (
        (TFLITE_FLOAT, []),
        (TFLITE_DYNAMIC_RANGE, [tf.lite.Optimize.DEFAULT]),
    ):
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model_dir, signature_keys=[SIGNATURE_KEY]
        )
        converter.optimizations = optimizations
        try:
            flatbuffer = converter.convert()
        except Exception as error:  # the converter raises its own ConverterError, and others
            raise TFLiteConversionError(
                f"TFLite cannot convert the {SIGNATURE_KEY!r} signature to {filename} (see the "
                "error above); pass tflite=False (--notflite) to export the SavedModel alone"
            ) from error
        with open(os.path.join(saved_model_dir, filename), "wb") as f:
            f.write(flatbuffer)


def _move_into_place(staging: str, target: str, overwrite: bool) -> None:
    """Renames the finished ``staging`` directory to ``target``."""
    if not os.path.exists(target):
        os.rename(staging, target)  # atomic; fails if target appeared meanwhile, non-empty
        return
    if not overwrite:
        raise FileExistsError(f"Export version directory {target!r} appeared during the export")
    if _exchange(staging, target):
        shutil.rmtree(staging)  # now holds the old version
        return
    # No atomic swap here: the version is missing between the two renames, never partial.
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or filesystem lacks it
        return False
    raise OSError(code, os.strerror(code), b)

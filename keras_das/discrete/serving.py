"""Export a trained image model for serving: a TF Serving SavedModel and TFLite files.

``export`` writes ``export_dir/<version>/`` in the layout TF Serving watches: a SavedModel
whose ``serving_default`` signature takes raw ``uint8`` images and returns probabilities
and classes over the last axis of the model's output (so a classifier ``[N, classes]`` and
a per-pixel model ``[N, H, W, classes]`` serve alike), plus ``model.tflite`` and ``model_dynamic_range.tflite`` with
the same contract. The version directory appears complete or not at all.

Example:
    >>> keras_das.export(model, "/tmp/serving/darts")  # writes /tmp/serving/darts/1/

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

SIGNATURE_KEY = "serving_default"
INPUT_NAME = "images"
PROBABILITIES = "probabilities"
CLASSES = "classes"
TFLITE_FLOAT = "model.tflite"
TFLITE_DYNAMIC_RANGE = "model_dynamic_range.tflite"


def export(
    model: keras.Model | str | os.PathLike,
    export_dir: str | os.PathLike,
    version: int | None = None,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    from_logits: bool = True,
    tflite: bool = True,
    overwrite: bool = False,
) -> str:
    """Exports an image model to ``export_dir/<version>/``.

    The SavedModel's ``serving_default`` signature takes ``images``, a ``uint8`` tensor
    ``[N, H, W, C]`` (any N), computes ``(images / 255 - mean) / std``, runs the model in
    inference mode and returns ``{"probabilities": float32 [N, ..., classes], "classes":
    int64 [N, ...]}``: the softmax and the argmax over the last axis of the model's output,
    which may have any rank from 2 (``[N, classes]`` for a classifier, ``[N, H, W,
    classes]`` for segmentation).

    The TFLite files take and return the same (``model.tflite`` in float32,
    ``model_dynamic_range.tflite`` with weights quantised to 8 bits), but the TFLite
    interpreter does not check input shapes.

    Everything is written to a hidden temporary directory in ``export_dir`` (TF Serving
    ignores names that are not numbers) and renamed into place at the end, so a failure
    leaves no partial version behind.

    Args:
        model: a Keras model taking one image batch ``[N, H, W, C]`` and returning one
            tensor ``[N, ..., classes]``, or the path of a saved ``.keras`` model.
        export_dir: the base directory TF Serving watches; created if missing.
        version: the version directory to write. Default: one more than the largest
            numeric version already in ``export_dir``, or 1.
        mean: per-channel mean of pixels / 255 (one value, or one per channel).
        std: per-channel standard deviation of pixels / 255 (positive).
        from_logits: the model outputs logits (softmax applied in the signature); pass
            ``False`` for a model that already outputs probabilities.
        tflite: also write the two TFLite files.
        overwrite: replace an existing version directory (atomically where the OS can
            swap directories, as Linux can) instead of refusing.

    Returns:
        The path of the version directory.

    Raises:
        ValueError: the model does not take one image batch with known height, width and
            channels, ``mean``/``std``/``version`` are invalid, or the model's output is
            not one tensor of rank 2 or more.
        FileExistsError: the version directory exists and ``overwrite`` is False.
    """
    if not isinstance(model, keras.Model):
        model = keras.models.load_model(model, compile=False)
    image_shape = _image_shape(model)
    channels = image_shape[-1]
    mean = _per_channel("mean", mean, channels)
    std = _per_channel("std", std, channels)
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std!r}")

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

    archive = _serving_archive(model, image_shape, mean, std, from_logits)
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


def _serving_archive(model, image_shape, mean, std, from_logits):
    """An ExportArchive holding the model and its ``serving_default`` endpoint."""
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
                "export expects a model returning one tensor [N, ..., classes] (rank 2 or "
                f"more, classes on the last axis); model {model.name!r} returns {outputs!r}"
            )
        outputs = tf.cast(outputs, tf.float32)
        probabilities = tf.nn.softmax(outputs, axis=-1) if from_logits else outputs
        return {
            PROBABILITIES: probabilities,
            CLASSES: tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SIGNATURE_KEY,
        serve,
        input_signature=[tf.TensorSpec([None, *image_shape], tf.uint8, name=INPUT_NAME)],
    )
    return archive


def _write_tflite(saved_model_dir: str) -> None:
    for filename, optimizations in (
        (TFLITE_FLOAT, []),
        (TFLITE_DYNAMIC_RANGE, [tf.lite.Optimize.DEFAULT]),
    ):
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model_dir, signature_keys=[SIGNATURE_KEY]
        )
        converter.optimizations = optimizations
        with open(os.path.join(saved_model_dir, filename), "wb") as f:
            f.write(converter.convert())


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

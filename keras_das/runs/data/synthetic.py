"""The built-in ``synthetic`` dataset: textures of oriented dot pairs, no download needed."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf

from keras_das.runs.data import statistics
from keras_das.runs.data.source import DatasetInfo
from keras_das.runs.data.source import Source
from keras_das.runs.data.source import limit

SYNTHETIC = "synthetic"

SYNTHETIC_IMAGE_SHAPE = (32, 32, 3)
SYNTHETIC_NUM_TRAIN = 5000
SYNTHETIC_NUM_TEST = 1000
# The class of an image is the displacement (dy, dx) from the bright to the dim dot of every
# dot pair in it; each pair takes (dy, dx) or its mirror image (dy, -dx), so that a
# horizontal flip keeps the class. No displacement fits in a 3x3 window. The ten come in
# three orbits of the square's symmetries: ops that treat all directions alike (pooling)
# cannot tell the members of an orbit apart by themselves.
SYNTHETIC_DISPLACEMENTS = (
    (4, 2),
    (-4, 2),
    (2, 4),
    (-2, 4),
    (3, 1),
    (-3, 1),
    (1, 3),
    (-1, 3),
    (4, 4),
    (-4, 4),
)
_PAIRS = 32  # dot pairs per image
_NOISE = 0.04  # std of the pixel noise, on pixels / 255


def synthetic_images(seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The built-in ``synthetic`` dataset: textures of oriented dot pairs, 10 classes.

    Each image has a dark background of a random colour and 32 pairs of one-pixel dots at
    random positions (wrapping around the border): a bright dot and a dim one, each of a
    random colour, ``SYNTHETIC_DISPLACEMENTS[label]`` apart (or its mirror image), plus pixel
    noise. A pixel, a 3x3 patch, the mean image of a class or the mean colour of an image
    say nothing about the class; the relative position of two dots 3 to 4 pixels apart
    does. Convolutions with a receptive field of 5 or more pixels learn it in a few epochs;
    a network whose only spatial ops after a 3x3 stem are pools learns it slowly and
    generalises poorly (tests/test_data.py). The background is dark so that the black
    padding of a random crop looks like background.

    Args:
        seed: the dataset's seed (``data.synthetic_seed``).
        split: ``"train"`` (5000 examples) or ``"test"`` (1000).

    Returns:
        ``(images, labels)``: uint8 ``[n, 32, 32, 3]`` and int32 ``[n]``, balanced classes.
    """
    return _images(int(seed), split)


def open_source(data_config: Any) -> Source:
    """The ``synthetic`` dataset of a ``data`` config (``synthetic_seed``, sizes)."""
    seed = int(data_config.synthetic_seed)
    mean, std = _stats(seed)
    info = DatasetInfo(
        name=SYNTHETIC,
        num_classes=len(SYNTHETIC_DISPLACEMENTS),
        image_shape=SYNTHETIC_IMAGE_SHAPE,
        mean=mean,
        std=std,
        num_train=limit(SYNTHETIC_NUM_TRAIN, data_config.num_examples, "num_examples", SYNTHETIC),
        num_test=limit(
            SYNTHETIC_NUM_TEST, data_config.num_test_examples, "num_test_examples", SYNTHETIC
        ),
    )

    def read(split: str, start: int, stop: int) -> tf.data.Dataset:
        images, labels = _images(seed, split)
        return tf.data.Dataset.from_tensors((images[start:stop], labels[start:stop]))

    return Source(info, read)


@functools.lru_cache(maxsize=4)
def _images(seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    sizes = {"train": SYNTHETIC_NUM_TRAIN, "test": SYNTHETIC_NUM_TEST}
    if split not in sizes:
        raise ValueError(f"Unknown split {split!r}; expected one of {sorted(sizes)}")
    n = sizes[split]
    height, width, channels = SYNTHETIC_IMAGE_SHAPE
    rng = np.random.default_rng([seed, sorted(sizes).index(split)])
    num_classes = len(SYNTHETIC_DISPLACEMENTS)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)

    displacement = np.asarray(SYNTHETIC_DISPLACEMENTS)[labels][:, None, :]  # [n, 1, 2]
    mirror = np.where(rng.random((n, _PAIRS, 1)) < 0.5, [[[1, -1]]], [[[1, 1]]])
    # Positions wrap around, so that every pixel is as likely to hold a dot in every class.
    size = np.asarray([height, width])
    first = rng.integers(0, size, (n, _PAIRS, 2))
    second = (first + displacement * mirror) % size

    background = rng.uniform(0.0, 0.15, (n, 1, 1, channels))
    images = np.repeat(np.repeat(background, height, axis=1), width, axis=2)
    image_index = np.repeat(np.arange(n), _PAIRS)
    for dots, low, high in ((second, 0.35, 0.55), (first, 0.75, 1.0)):
        colour = rng.uniform(low, high, (n, channels))
        images[(image_index, *dots.reshape(-1, 2).T)] = colour[image_index]
    images += rng.normal(0.0, _NOISE, images.shape)
    images = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=4)
def _stats(seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std, _ = statistics.channel_stats([_images(seed, "train")[0]])
    return mean, std

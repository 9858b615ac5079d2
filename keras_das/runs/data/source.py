"""What a dataset source hands the pipelines: its ``DatasetInfo`` and its examples.

Every source (``synthetic``, ``tfds_source``, or a user's function named by ``data.name``,
see ``registry``) gives each split as one element, all images and all labels, so that the
pipelines can shuffle and augment by index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    Attributes:
        name: the dataset name, as in the config.
        num_classes: number of labels.
        image_shape: ``(height, width, channels)``.
        mean: per-channel mean of the training split, on pixels / 255.
        std: per-channel standard deviation, likewise.
        num_train: examples of the train split in use (after ``num_examples``).
        num_test: examples of the test split in use (after ``num_test_examples``).
        label_shape: the shape of one example's label: ``()`` for a class index (image
            classification), ``(H, W)`` for a class per pixel (segmentation).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int
    label_shape: tuple[int, ...] = ()

    def fits(self, input_shape) -> bool:
        """Whether a model input of ``input_shape`` (batch axis first; None: any size)
        takes this dataset's image batches."""
        dims = tuple(input_shape)[1:]
        return len(dims) == len(self.image_shape) and all(
            d is None or d == s for d, s in zip(dims, self.image_shape)
        )


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened dataset.

    Attributes:
        info: the dataset's ``DatasetInfo``.
        read: ``read(split, start, stop)`` is a dataset of one element: uint8 images
            ``[n, H, W, C]`` and int32 labels ``[n, *info.label_shape]`` of examples
            ``[start, stop)`` of the split (``"train"`` or ``"test"``).
    """

    info: DatasetInfo
    read: Callable[[str, int, int], tf.data.Dataset]


def limit(available: int, requested: int | None, field: str, name: str) -> int:
    """The examples of a split in use: ``requested`` (a config field) or all of them."""
    if requested is None:
        return available
    if requested > available:
        raise ValueError(
            f"data.{field}={requested} is larger than the {available} examples of {name!r}"
        )
    return requested

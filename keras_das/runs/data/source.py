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

    def check_inputs(self, model, what: str) -> None:
        """Raises a ValueError, starting with ``what``, unless ``model`` takes one input that
        fits this dataset's image batches (None: any size); a model with no Keras inputs
        yet (subclassed) passes."""
        inputs = getattr(model, "inputs", None)
        if not inputs:
            return
        dims = tuple(inputs[0].shape)[1:]
        if (
            len(inputs) != 1
            or len(dims) != len(self.image_shape)
            or any(d is not None and d != s for d, s in zip(dims, self.image_shape))
        ):
            raise ValueError(
                f"{what} {[tuple(x.shape) for x in inputs]}; the dataset {self.name!r} gives "
                f"image batches (None, {', '.join(map(str, self.image_shape))})"
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

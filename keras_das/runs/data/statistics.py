"""Per-channel statistics of datasets: known values, and computed ones cached on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from keras_das import io_utils

# Per-channel statistics of the full training split, on pixels / 255 (population std over
# all pixels). cifar10 is exact (the tfds README in ../shared/tfds); the others are the
# values published to 4 decimals (torchvision examples and model zoos).
KNOWN_STATS = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

# Examples read to estimate the statistics of a dataset that has no known values.
STATS_SAMPLE_SIZE = 10_000
# Overrides the cache of computed statistics (default ~/.cache/keras_das).
CACHE_DIR_ENV = "KERAS_DAS_CACHE_DIR"


def cache_dir() -> str:
    """Where computed statistics are cached: ``$KERAS_DAS_CACHE_DIR`` or ~/.cache/keras_das."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "keras_das")
    return os.environ.get(CACHE_DIR_ENV) or default


def channel_stats(
    batches: Iterable[np.ndarray],
) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and population std on pixels / 255 of uint8 image batches.

    Returns:
        ``(mean, std, number_of_images)``.
    """
    total = total_sq = 0.0
    pixels = images = 0
    for batch in batches:
        values = batch.reshape(-1, batch.shape[-1]).astype(np.float64) / 255.0
        total = total + values.sum(axis=0)
        total_sq = total_sq + np.square(values).sum(axis=0)
        pixels += values.shape[0]
        images += batch.shape[0]
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    return tuple(mean.tolist()), tuple(std.tolist()), images


def cached_stats(full_name: str, sample: tf.data.Dataset) -> tuple[tuple, tuple]:
    """The statistics of a sample of the train split, computed once and cached as JSON.

    Args:
        full_name: the dataset's name and version (the cache key).
        sample: a dataset of ``(uint8 image, label)`` examples.

    Returns:
        ``(mean, std)`` per channel.
    """
    path = os.path.join(cache_dir(), "stats", f"{full_name}.json")
    if os.path.exists(path):
        with open(path) as f:
            stats = json.load(f)
        return tuple(stats["mean"]), tuple(stats["std"])
    batches = (images for images, _ in sample.batch(1000).as_numpy_iterator())
    mean, std, count = channel_stats(batches)
    stats = {"dataset": full_name, "num_examples": count, "mean": mean, "std": std}
    io_utils.atomic_write_text(path, json.dumps(stats, indent=1) + "\n")
    return mean, std

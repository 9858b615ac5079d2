"""The per-batch transform of the pipelines: random crop and flip, normalisation, cutout.

Every random choice is read from a table of uniform draws, one row per example
(``NUM_DRAWS`` columns), so that the augmentation of an example depends only on the draws
the pipelines give it.
"""

from __future__ import annotations

import tensorflow as tf

from keras_das.runs.data.source import DatasetInfo

# Padding of the random crop, in pixels (DARTS: RandomCrop(32, padding=4)).
CROP_PADDING = 4
# Columns of the per-example random table: crop row, crop column, flip, cutout row and column.
NUM_DRAWS = 5


def transform(images, draws, *, info: DatasetInfo, augment: bool, cutout: int):
    """uint8 images [B, H, W, C] -> augmented, normalised float32 images.

    Args:
        images: uint8 images ``[B, H, W, C]``.
        draws: uniform [0, 1) draws ``[B, NUM_DRAWS]``; None when neither ``augment`` nor
            ``cutout``.
        info: the dataset (its mean and std normalise).
        augment: random crop with ``CROP_PADDING`` zero padding, and horizontal flip.
        cutout: side of the square of zeros (after normalisation, as in DARTS); 0 = off.
    """
    x = tf.cast(images, tf.float32)
    if augment:
        x = _random_crop(x, draws[:, 0], draws[:, 1], CROP_PADDING)
        x = tf.where(draws[:, 2, None, None, None] < 0.5, tf.reverse(x, axis=[2]), x)
    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    x = (x / 255.0 - mean) / std
    if cutout:
        x = _cutout(x, draws[:, 3], draws[:, 4], cutout)
    return x


def _uniform_int(u, limit):
    """Maps uniform [0, 1) draws to ints in [0, limit)."""
    return tf.minimum(tf.cast(tf.floor(u * limit), tf.int32), limit - 1)


def _random_crop(x, u_row, u_col, padding):
    """Random crop of the image size from the image padded with zeros (black pixels)."""
    height, width = x.shape[1], x.shape[2]
    padded = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    rows = _uniform_int(u_row, 2 * padding + 1)[:, None] + tf.range(height)[None]
    cols = _uniform_int(u_col, 2 * padding + 1)[:, None] + tf.range(width)[None]
    x = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(x, cols, axis=2, batch_dims=1)


def _cutout(x, u_row, u_col, length):
    """DARTS cutout: zeros in a length x length square at a random centre, clipped."""
    height, width = x.shape[1], x.shape[2]
    centre_row = _uniform_int(u_row, height)[:, None]
    centre_col = _uniform_int(u_col, width)[:, None]
    rows = tf.range(height)[None]
    cols = tf.range(width)[None]
    in_rows = (rows >= centre_row - length // 2) & (rows < centre_row + length // 2)
    in_cols = (cols >= centre_col - length // 2) & (cols < centre_col + length // 2)
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return x * tf.cast(~inside, x.dtype)[..., None]

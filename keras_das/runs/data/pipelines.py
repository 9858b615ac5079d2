"""The tf.data streams of a search (search-train, search-val) and of a retraining.

``SearchData`` and ``TrainData`` check a ``data`` config, open its dataset once and know
their ``batch_size`` (``data.batch_size``, global over all replicas) and
``steps_per_epoch``; ``streams()`` makes the datasets, as often as needed.

Determinism and resuming: the training streams hold the epochs ``[initial_epoch, epochs)``
back to back, ``steps_per_epoch`` full batches each. The order of epoch ``e`` is a stateless
permutation seeded by ``(seed, e)`` and the augmentation of an example is drawn from a
stateless table seeded by ``(seed, e)`` and indexed by the example, so a run resumed at epoch
``k`` sees exactly the batches an uninterrupted run sees at epoch ``k``, and nothing depends
on TensorFlow's global seed. Consume them with ``model.fit(train_ds,
steps_per_epoch=steps_per_epoch, initial_epoch=initial_epoch, epochs=epochs)``.

Example:
    >>> search = data.SearchData(config.data, seed=2)
    >>> train_ds, val_ds = search.streams()
    >>> train_ds, test_ds = data.TrainData(config.data, seed=0).streams(10, 600)
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf

from keras_das.runs.data import augment
from keras_das.runs.data import config
from keras_das.runs.data import registry
from keras_das.runs.data.source import DatasetInfo

# Stream ids, so that the streams of one seed do not share random numbers.
_SEARCH_TRAIN, _SEARCH_VAL, _TRAIN = 0, 1, 2


class _Data:
    """What the search and the retraining data share: one opened dataset, its batches.

    Args:
        data_config: the ``data`` config.
        seed: seeds the order and augmentation of every epoch (``streams()`` may override).

    Attributes:
        info: the dataset's ``DatasetInfo``.
        batch_size: examples per batch, over all replicas (``data_config.batch_size``).
        steps_per_epoch: full batches per epoch of every training stream.

    Raises:
        ValueError: a bad config value, a dataset that cannot be opened, or a batch larger
            than a split.
    """

    def __init__(self, data_config: Any, seed: int):
        config.check_config(data_config)
        self.data_config = data_config
        self.seed = seed
        self.batch_size = data_config.batch_size
        self._source = registry.open_source(data_config)
        self.info: DatasetInfo = self._source.info
        if self.info.label_shape and data_config.augment:
            raise ValueError(
                f"data.augment=True crops and flips the images of {data_config.name!r} but "
                f"not their labels of shape {tuple(self.info.label_shape)}; set "
                "data.augment=False (cutout, which leaves the labels valid, may stay)"
            )
        sizes = self._split_sizes()
        _check_batch_size(self.batch_size, sizes, data_config)
        self.steps_per_epoch: int = min(sizes.values()) // self.batch_size

    def _split_sizes(self) -> dict[str, int]:
        """The sizes of the splits the training streams draw from (each subclass's own)."""
        raise NotImplementedError(f"{type(self).__name__} must define _split_sizes()")

    def _training_stream(self, start, stop, stream, seed, initial_epoch, epochs):
        """Examples ``[start, stop)`` of the train split as a training stream."""
        return _training_stream(
            self._source.read("train", start, stop),
            self.info,
            self.data_config,
            self.batch_size,
            self.steps_per_epoch,
            (self.seed if seed is None else seed, stream),
            initial_epoch,
            epochs,
        )


class SearchData(_Data):
    """The DARTS search split: the train split halved into search-train and search-val.

    Search-train is the first ``train_portion`` of the train split, search-val the rest.
    Both get the training augmentation (as in DARTS): random crop with zero padding and
    horizontal flip when ``augment``, normalisation, and cutout when ``cutout > 0``. Both
    streams have exactly ``steps_per_epoch = min(len(search-train), len(search-val)) //
    batch_size`` batches per epoch, so that they can be consumed in lockstep (one val batch
    per train batch).
    """

    @property
    def _split(self) -> int:
        """Examples of search-train: the first ``train_portion`` of the train split."""
        return int(np.floor(self.data_config.train_portion * self.info.num_train))

    def _split_sizes(self) -> dict[str, int]:
        return {"search-train": self._split, "search-val": self.info.num_train - self._split}

    def streams(
        self, initial_epoch: int = 0, epochs: int | None = None, seed: int | None = None
    ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        """The search-train and search-val streams.

        Args:
            initial_epoch: first epoch of the streams (to resume a run).
            epochs: end of the streams (exclusive); None repeats forever.
            seed: None for the seed given to the constructor.

        Returns:
            ``(train_ds, val_ds)``: batches of float32 NHWC images and int32 labels.
        """
        _check_epochs(initial_epoch, epochs)
        slices = ((0, self._split, _SEARCH_TRAIN), (self._split, self.info.num_train, _SEARCH_VAL))
        train_ds, val_ds = (
            self._training_stream(start, stop, stream, seed, initial_epoch, epochs)
            for start, stop, stream in slices
        )
        return train_ds, val_ds


class TrainData(_Data):
    """The retraining split: the whole train split augmented, and the test split.

    Training examples get random crop and flip (when ``augment``), normalisation and cutout
    (when ``cutout > 0``: a square of zeros at a random centre, clipped at the border, after
    normalisation, as in DARTS); ``steps_per_epoch = num_train // batch_size``. Test
    examples are only normalised; the test stream is one pass, in order, with a last
    partial batch (for ``evaluate()``).
    """

    def _split_sizes(self) -> dict[str, int]:
        return {"train": self.info.num_train}

    def streams(
        self, initial_epoch: int = 0, epochs: int | None = None, seed: int | None = None
    ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        """The training stream and the test stream.

        Args:
            initial_epoch: first epoch of the training stream (to resume a run).
            epochs: end of the training stream (exclusive); None repeats forever.
            seed: None for the seed given to the constructor.

        Returns:
            ``(train_ds, test_ds)``: batches of float32 NHWC images and int32 labels.
        """
        _check_epochs(initial_epoch, epochs)
        info = self.info
        train_ds = self._training_stream(0, info.num_train, _TRAIN, seed, initial_epoch, epochs)
        normalize = functools.partial(
            augment.transform, draws=None, info=info, augment=False, cutout=0
        )
        batch_size = self.batch_size

        def test_batches(images, labels):
            order = tf.range(tf.shape(labels, out_type=tf.int64)[0])
            return _batches(images, labels, order, None, batch_size, False, normalize)

        test_ds = self._source.read("test", 0, info.num_test).flat_map(test_batches)
        test_ds = _finish(test_ds, -(-info.num_test // batch_size))
        return train_ds, test_ds


def search_datasets(
    data_config: Any,
    global_batch_size: int,
    seed: int,
    initial_epoch: int = 0,
    epochs: int | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo, int]:
    """``SearchData(data_config, seed)`` with a batch size of its own, opened for one use.

    Args:
        data_config: the ``data`` config (its ``batch_size`` is not read).
        global_batch_size: examples per batch, over all replicas.
        seed: seeds the order and augmentation of every epoch.
        initial_epoch: first epoch of the streams (to resume a run).
        epochs: end of the streams (exclusive); None repeats forever.

    Returns:
        ``(train_ds, val_ds, info, steps_per_epoch)``, as ``SearchData`` has them.

    Raises:
        ValueError: a bad config value or a batch larger than a split.
    """
    return _one_use(SearchData, data_config, global_batch_size, seed, initial_epoch, epochs)


def train_datasets(
    data_config: Any,
    global_batch_size: int,
    seed: int,
    initial_epoch: int = 0,
    epochs: int | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo, int]:
    """``TrainData(data_config, seed)`` with a batch size of its own, opened for one use.

    Args:
        data_config: the ``data`` config (its ``batch_size`` is not read).
        global_batch_size: examples per batch, over all replicas.
        seed: seeds the order and augmentation of every epoch.
        initial_epoch: first epoch of the training stream (to resume a run).
        epochs: end of the training stream (exclusive); None repeats forever.

    Returns:
        ``(train_ds, test_ds, info, steps_per_epoch)``, as ``TrainData`` has them.

    Raises:
        ValueError: a bad config value or a batch larger than the train split.
    """
    return _one_use(TrainData, data_config, global_batch_size, seed, initial_epoch, epochs)


def _one_use(data_class, data_config, global_batch_size, seed, initial_epoch, epochs):
    """``data_class(...)`` opened for one use: its two streams, info and steps."""
    config.check_config(data_config)
    _check_epochs(initial_epoch, epochs)  # before a TFDS dataset is downloaded
    data = data_class(_with_batch_size(data_config, global_batch_size), seed)
    first, second = data.streams(initial_epoch, epochs)
    return first, second, data.info, data.steps_per_epoch


def _with_batch_size(data_config: Any, batch_size: int) -> ml_collections.ConfigDict:
    """A copy of the ``data`` config with another ``batch_size`` (the caller's is kept)."""
    copy = ml_collections.ConfigDict(data_config).copy_and_resolve_references()
    copy.batch_size = batch_size
    return copy


# ---------------------------------------------------------------------------------------
# Checks


def _check_epochs(initial_epoch: int, epochs: int | None) -> None:
    if initial_epoch < 0:
        raise ValueError(f"initial_epoch must be >= 0, got {initial_epoch!r}")
    if epochs is not None and epochs <= initial_epoch:
        raise ValueError(
            f"epochs must be None or larger than initial_epoch={initial_epoch}, got {epochs!r}"
        )


def _check_batch_size(batch_size: int, sizes: dict[str, int], data_config: Any) -> None:
    if batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {batch_size!r}")
    for split, size in sizes.items():
        if batch_size > size:
            raise ValueError(
                f"global_batch_size {batch_size} is larger than the {split} split of "
                f"{data_config.name!r} ({size} examples); use a smaller batch or more "
                f"examples (data.num_examples={data_config.num_examples!r})"
            )


# ---------------------------------------------------------------------------------------
# Streams


def _training_stream(
    source: tf.data.Dataset,
    info: DatasetInfo,
    data_config: Any,
    batch_size: int,
    steps: int,
    seed: tuple[int, int],
    initial_epoch: int,
    epochs: int | None,
) -> tf.data.Dataset:
    """Epochs [initial_epoch, epochs) of ``steps`` shuffled, augmented batches each."""
    transform = functools.partial(
        augment.transform,
        info=info,
        augment=bool(data_config.augment),
        cutout=int(data_config.cutout),
    )
    key = tf.constant(seed, tf.int64)

    def one_epoch(epoch):
        epoch_key = tf.random.experimental.stateless_fold_in(key, epoch)
        order_key, draws_key = tf.unstack(tf.random.experimental.stateless_split(epoch_key, 2))

        def batches(images, labels):
            n = tf.shape(labels, out_type=tf.int64)[0]
            order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=order_key)
            # One row of random numbers per example (indexed by the example, not by its
            # position in the epoch): the augmentation of an example depends on
            # (seed, epoch, example) only.
            draws = tf.random.stateless_uniform([n, augment.NUM_DRAWS], seed=draws_key)
            order = order[: steps * batch_size]
            return _batches(images, labels, order, draws, batch_size, True, transform)

        return source.flat_map(batches)

    if epochs is None:
        epoch_ds = tf.data.Dataset.counter(initial_epoch)
        num_batches = tf.data.INFINITE_CARDINALITY
    else:
        epoch_ds = tf.data.Dataset.range(initial_epoch, epochs)
        num_batches = (epochs - initial_epoch) * steps
    return _finish(epoch_ds.flat_map(one_epoch), num_batches)


def _batches(images, labels, order, draws, batch_size, drop_remainder, transform):
    """Batches of ``transform(images[i], labels[i], draws[i])`` for i in ``order``."""

    def make_batch(index):
        batch_draws = None if draws is None else tf.gather(draws, index)
        x = transform(tf.gather(images, index), draws=batch_draws)
        return x, tf.gather(labels, index)

    index_ds = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder)
    return index_ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _finish(ds: tf.data.Dataset, num_batches: int) -> tf.data.Dataset:
    # A known length lets Keras size its progress bar and end evaluate() without a warning.
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
    options = tf.data.Options()
    options.deterministic = True
    # A multi-worker strategy must not shard by file (one file, and a global order that all
    # workers share): each worker takes its part of every global batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

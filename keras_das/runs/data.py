"""Input pipelines for architecture search and retraining.

Any TFDS image-classification dataset works by name (``cifar10``, ``cifar100``, ``mnist``,
``fashion_mnist``, ...), and ``synthetic`` is a built-in dataset that needs no download.
Everything is driven by a ``data`` config section, ``default_config()``: ``name``,
``data_dir``, ``train_portion``, ``augment``, ``cutout``, ``batch_size``, ``num_examples``,
``num_test_examples``, ``synthetic_seed``.

Determinism and resuming: the training streams hold the epochs ``[initial_epoch, epochs)``
back to back, ``steps_per_epoch`` full batches each. The order of epoch ``e`` is a stateless
permutation seeded by ``(seed, e)`` and the augmentation of an example is drawn from a
stateless table seeded by ``(seed, e)`` and indexed by the example, so a run resumed at epoch
``k`` sees exactly the batches an uninterrupted run sees at epoch ``k``, and nothing depends
on TensorFlow's global seed. Consume them with ``model.fit(train_ds,
steps_per_epoch=steps_per_epoch, initial_epoch=initial_epoch, epochs=epochs)``.

Example:
    >>> train_ds, val_ds, info, steps = data.search_datasets(config.data, 64, seed=2)
    >>> train_ds, test_ds, info, steps = data.train_datasets(config.data, 96, seed=0,
    ...                                                      initial_epoch=10, epochs=600)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
from ml_collections import config_dict

from keras_das import io_utils

SYNTHETIC = "synthetic"

# Per-channel statistics of the full training split, on pixels / 255 (population std over
# all pixels). cifar10 is exact (the tfds README in ../shared/tfds); the others are the
# values published to 4 decimals (torchvision examples and model zoos).
KNOWN_STATS = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

# Padding of the random crop, in pixels (DARTS: RandomCrop(32, padding=4)).
CROP_PADDING = 4
# Examples read to estimate the statistics of a dataset that has no known values.
STATS_SAMPLE_SIZE = 10_000
# Overrides the cache of computed statistics (default ~/.cache/keras_das).
CACHE_DIR_ENV = "KERAS_DAS_CACHE_DIR"

# Columns of the per-example random table: crop row, crop column, flip, cutout row and column.
_NUM_DRAWS = 5
# Stream ids, so that the streams of one seed do not share random numbers.
_SEARCH_TRAIN, _SEARCH_VAL, _TRAIN = 0, 1, 2


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
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``data`` config section, with the DARTS search defaults on CIFAR-10.

    Args:
        **overrides: fields to change, e.g. ``batch_size=96, cutout=16``.

    Returns:
        A ConfigDict with every field the functions of this module read.
    """
    config = ml_collections.ConfigDict(
        {
            "name": "cifar10",  # "synthetic" or a TFDS image-classification dataset
            "data_dir": config_dict.placeholder(str),  # None: the TFDS default
            "train_portion": 0.5,  # share of the train split that is search-train
            "augment": True,  # random crop (4-pixel zero padding) and horizontal flip
            "cutout": 0,  # side of the cutout square; 0 = off
            "batch_size": 64,  # global, over all replicas
            "num_examples": config_dict.placeholder(int),  # None: the whole train split
            "num_test_examples": config_dict.placeholder(int),  # None: the whole test split
            "synthetic_seed": 0,  # seeds the images of the "synthetic" dataset
        }
    )
    config.lock()  # a misspelt override is an error (with a suggestion), not a new field
    for field, value in overrides.items():
        setattr(config, field, value)
    config.unlock()
    return config


def get_info(data_config: Any) -> DatasetInfo:
    """Describes the dataset a data config names, preparing it if needed.

    A TFDS dataset that is not prepared in ``data_dir`` is downloaded and prepared by TFDS.

    Args:
        data_config: the ``data`` config.

    Returns:
        The dataset's ``DatasetInfo``.

    Raises:
        ValueError: unknown dataset, a dataset that is not prepared and cannot be
            downloaded, not an image-classification dataset, or a bad config value.
    """
    _check_config(data_config)
    return _dataset(data_config).info


def search_datasets(
    data_config: Any,
    global_batch_size: int,
    seed: int,
    initial_epoch: int = 0,
    epochs: int | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo, int]:
    """The DARTS search split: the train split halved into search-train and search-val.

    Search-train is the first ``train_portion`` of the train split, search-val the rest.
    Both get the training augmentation (as in DARTS): random crop with zero padding and
    horizontal flip when ``augment``, normalisation, and cutout when ``cutout > 0``. Both
    streams have exactly ``steps_per_epoch`` batches per epoch, so that they can be consumed
    in lockstep (one val batch per train batch).

    Args:
        data_config: the ``data`` config.
        global_batch_size: examples per batch, over all replicas.
        seed: seeds the order and augmentation of every epoch.
        initial_epoch: first epoch of the streams (to resume a run).
        epochs: end of the streams (exclusive); None repeats forever.

    Returns:
        ``(train_ds, val_ds, info, steps_per_epoch)``: batches of float32 NHWC images and
        int32 labels, ``steps_per_epoch = min(len(search-train), len(search-val)) //
        global_batch_size``.

    Raises:
        ValueError: a bad config value or a batch larger than a split.
    """
    _check_config(data_config)
    _check_epochs(initial_epoch, epochs)
    dataset = _dataset(data_config)
    num_train = dataset.info.num_train
    split = int(np.floor(data_config.train_portion * num_train))
    sizes = {"search-train": split, "search-val": num_train - split}
    _check_batch_size(global_batch_size, sizes, data_config)
    steps = min(sizes.values()) // global_batch_size
    train_source = dataset.source("train", 0, split)
    val_source = dataset.source("train", split, num_train)
    train_ds, val_ds = (
        _training_stream(
            source,
            dataset.info,
            data_config,
            global_batch_size,
            steps,
            (seed, stream),
            initial_epoch,
            epochs,
        )
        for source, stream in ((train_source, _SEARCH_TRAIN), (val_source, _SEARCH_VAL))
    )
    return train_ds, val_ds, dataset.info, steps


def train_datasets(
    data_config: Any,
    global_batch_size: int,
    seed: int,
    initial_epoch: int = 0,
    epochs: int | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo, int]:
    """The retraining split: the whole train split augmented, and the test split.

    Training examples get random crop and flip (when ``augment``), normalisation and cutout
    (when ``cutout > 0``: a square of zeros at a random centre, clipped at the border, after
    normalisation, as in DARTS). Test examples are only normalised; the test stream is one
    pass, in order, with a last partial batch (for ``evaluate()``).

    Args:
        data_config: the ``data`` config.
        global_batch_size: examples per batch, over all replicas.
        seed: seeds the order and augmentation of every epoch.
        initial_epoch: first epoch of the training stream (to resume a run).
        epochs: end of the training stream (exclusive); None repeats forever.

    Returns:
        ``(train_ds, test_ds, info, steps_per_epoch)`` with ``steps_per_epoch =
        num_train // global_batch_size``.

    Raises:
        ValueError: a bad config value or a batch larger than the train split.
    """
    _check_config(data_config)
    _check_epochs(initial_epoch, epochs)
    dataset = _dataset(data_config)
    info = dataset.info
    _check_batch_size(global_batch_size, {"train": info.num_train}, data_config)
    steps = info.num_train // global_batch_size
    train_ds = _training_stream(
        dataset.source("train", 0, info.num_train),
        info,
        data_config,
        global_batch_size,
        steps,
        (seed, _TRAIN),
        initial_epoch,
        epochs,
    )
    normalize = functools.partial(_transform, draws=None, info=info, augment=False, cutout=0)

    def test_batches(images, labels):
        order = tf.range(tf.shape(labels, out_type=tf.int64)[0])
        return _batches(images, labels, order, None, global_batch_size, False, normalize)

    test_ds = dataset.source("test", 0, info.num_test).flat_map(test_batches)
    test_ds = _finish(test_ds, -(-info.num_test // global_batch_size))
    return train_ds, test_ds, info, steps


# ---------------------------------------------------------------------------------------
# Checks


def _check_config(data_config: Any) -> None:
    portion = data_config.train_portion
    if not 0.0 < portion < 1.0:
        raise ValueError(f"data.train_portion must be in (0, 1), got {portion!r}")
    cutout = data_config.cutout
    if not isinstance(cutout, int) or cutout < 0:
        raise ValueError(f"data.cutout must be an int >= 0 (0 = off), got {cutout!r}")
    for field in ("num_examples", "num_test_examples"):
        value = data_config[field]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"data.{field} must be None (all) or an int >= 1, got {value!r}")


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


def _limit(available: int, requested: int | None, field: str, name: str) -> int:
    if requested is None:
        return available
    if requested > available:
        raise ValueError(
            f"data.{field}={requested} is larger than the {available} examples of {name!r}"
        )
    return requested


# ---------------------------------------------------------------------------------------
# Sources: every split as one cached element (all images, all labels)


@dataclasses.dataclass(frozen=True)
class _Dataset:
    info: DatasetInfo
    # source(split, start, stop) -> a dataset of one element: uint8 images [n, H, W, C] and
    # int32 labels [n] of examples [start, stop) of the split.
    source: Any


def _dataset(data_config: Any) -> _Dataset:
    if data_config.name == SYNTHETIC:
        return _synthetic_dataset(data_config)
    return _tfds_dataset(data_config)


def _tfds_dataset(data_config: Any) -> _Dataset:
    # tensorflow_datasets takes seconds to import; only TFDS datasets need it.
    import tensorflow_datasets as tfds

    name = data_config.name
    data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else None
    builder = _tfds_builder(tfds, name, data_dir)
    image_key, label_key = _supervised_keys(tfds, builder, name)
    image_shape = tuple(builder.info.features[image_key].shape)
    num_classes = builder.info.features[label_key].num_classes
    read_config = tfds.ReadConfig(try_autocache=False)  # we cache the decoded split

    def read(split: str, start: int, stop: int) -> tf.data.Dataset:
        # Under tfds.testing.mock_data every split yields the same examples whatever the
        # slice; take() makes the size right there too.
        ds = builder.as_dataset(
            split=f"{split}[{start}:{stop}]",
            as_supervised=True,
            shuffle_files=False,
            read_config=read_config,
        )
        return ds.take(stop - start)

    def source(split: str, start: int, stop: int) -> tf.data.Dataset:
        ds = read(split, start, stop).batch(stop - start)
        return ds.map(lambda x, y: (x, tf.cast(y, tf.int32))).cache()

    available = _split_size(builder, "train", name)
    num_train = _limit(available, data_config.num_examples, "num_examples", name)
    num_test = _limit(
        _split_size(builder, "test", name),
        data_config.num_test_examples,
        "num_test_examples",
        name,
    )
    if builder.name in KNOWN_STATS:  # builder.name drops a version: "cifar10:3.0.2"
        mean, std = KNOWN_STATS[builder.name]
    else:
        sample = min(available, STATS_SAMPLE_SIZE)  # whatever num_examples is
        mean, std = _cached_stats(builder.info.full_name, read("train", 0, sample))
    info = DatasetInfo(
        name=name,
        num_classes=int(num_classes),
        image_shape=image_shape,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        num_train=num_train,
        num_test=num_test,
    )
    return _Dataset(info, source)


def _tfds_builder(tfds: Any, name: str, data_dir: str | None) -> Any:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        close = difflib.get_close_matches(name, [SYNTHETIC, *tfds.list_builders()], n=3)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(
            f"Unknown dataset {name!r} (data_dir={data_dir!r}); expected {SYNTHETIC!r} or the "
            f"name of a TFDS image-classification dataset such as "
            f"{sorted(KNOWN_STATS)}{hint}"
        ) from e
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:  # any failure: offline, no space, manual download needed
            raise ValueError(
                f"Dataset {name!r} is not prepared in data_dir={data_dir!r} "
                f"({builder.data_dir}) and could not be downloaded: {type(e).__name__}: {e}. "
                f"Prepare it where there is a network (`tfds build {name} --data_dir=DIR`) "
                f"and point data.data_dir at DIR."
            ) from e
    return builder


def _supervised_keys(tfds: Any, builder: Any, name: str) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    features = builder.info.features
    ok = (
        isinstance(keys, tuple)
        and len(keys) == 2
        and all(isinstance(k, str) for k in keys)
        and isinstance(features[keys[0]], tfds.features.Image)
        and None not in features[keys[0]].shape
        and isinstance(features[keys[1]], tfds.features.ClassLabel)
    )
    if not ok:
        raise ValueError(
            f"Dataset {name!r} is not an image-classification dataset with a fixed image "
            f"shape (supervised keys {keys!r}, features {features})"
        )
    return keys


def _split_size(builder: Any, split: str, name: str) -> int:
    splits = builder.info.splits
    if split in splits:
        return splits[split].num_examples
    if splits:  # a prepared dataset without this split
        raise ValueError(f"Dataset {name!r} has no {split!r} split; it has {sorted(splits)}")
    # tfds.testing.mock_data knows no split sizes; its datasets know their cardinality.
    return int(builder.as_dataset(split=split).cardinality())


def _cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "keras_das")
    return os.environ.get(CACHE_DIR_ENV) or default


def _channel_stats(batches) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and population std on pixels / 255 of uint8 image batches."""
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


def _cached_stats(full_name: str, sample: tf.data.Dataset) -> tuple[tuple, tuple]:
    """The statistics of a sample of the train split, computed once and cached as JSON."""
    path = os.path.join(_cache_dir(), "stats", f"{full_name}.json")
    if os.path.exists(path):
        with open(path) as f:
            stats = json.load(f)
        return tuple(stats["mean"]), tuple(stats["std"])
    batches = (images for images, _ in sample.batch(1000).as_numpy_iterator())
    mean, std, count = _channel_stats(batches)
    stats = {"dataset": full_name, "num_examples": count, "mean": mean, "std": std}
    io_utils.atomic_write_text(path, json.dumps(stats, indent=1) + "\n")
    return mean, std


# ---------------------------------------------------------------------------------------
# The built-in synthetic dataset

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
_SYNTHETIC_PAIRS = 32  # dot pairs per image
_SYNTHETIC_NOISE = 0.04  # std of the pixel noise, on pixels / 255


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
    return _synthetic_images(int(seed), split)


@functools.lru_cache(maxsize=4)
def _synthetic_images(seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    sizes = {"train": SYNTHETIC_NUM_TRAIN, "test": SYNTHETIC_NUM_TEST}
    if split not in sizes:
        raise ValueError(f"Unknown split {split!r}; expected one of {sorted(sizes)}")
    n = sizes[split]
    height, width, channels = SYNTHETIC_IMAGE_SHAPE
    rng = np.random.default_rng([seed, sorted(sizes).index(split)])
    num_classes = len(SYNTHETIC_DISPLACEMENTS)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)

    displacement = np.asarray(SYNTHETIC_DISPLACEMENTS)[labels][:, None, :]  # [n, 1, 2]
    mirror = np.where(rng.random((n, _SYNTHETIC_PAIRS, 1)) < 0.5, [[[1, -1]]], [[[1, 1]]])
    # Positions wrap around, so that every pixel is as likely to hold a dot in every class.
    size = np.asarray([height, width])
    first = rng.integers(0, size, (n, _SYNTHETIC_PAIRS, 2))
    second = (first + displacement * mirror) % size

    background = rng.uniform(0.0, 0.15, (n, 1, 1, channels))
    images = np.repeat(np.repeat(background, height, axis=1), width, axis=2)
    image_index = np.repeat(np.arange(n), _SYNTHETIC_PAIRS)
    for dots, low, high in ((second, 0.35, 0.55), (first, 0.75, 1.0)):
        colour = rng.uniform(low, high, (n, channels))
        images[(image_index, *dots.reshape(-1, 2).T)] = colour[image_index]
    images += rng.normal(0.0, _SYNTHETIC_NOISE, images.shape)
    images = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=4)
def _synthetic_stats(seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std, _ = _channel_stats([_synthetic_images(seed, "train")[0]])
    return mean, std


def _synthetic_dataset(data_config: Any) -> _Dataset:
    seed = int(data_config.synthetic_seed)
    mean, std = _synthetic_stats(seed)
    info = DatasetInfo(
        name=SYNTHETIC,
        num_classes=len(SYNTHETIC_DISPLACEMENTS),
        image_shape=SYNTHETIC_IMAGE_SHAPE,
        mean=mean,
        std=std,
        num_train=_limit(
            SYNTHETIC_NUM_TRAIN,
            data_config.num_examples,
            "num_examples",
            SYNTHETIC,
        ),
        num_test=_limit(
            SYNTHETIC_NUM_TEST,
            data_config.num_test_examples,
            "num_test_examples",
            SYNTHETIC,
        ),
    )

    def source(split: str, start: int, stop: int) -> tf.data.Dataset:
        images, labels = _synthetic_images(seed, split)
        return tf.data.Dataset.from_tensors((images[start:stop], labels[start:stop]))

    return _Dataset(info, source)


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
        _transform,
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
            draws = tf.random.stateless_uniform([n, _NUM_DRAWS], seed=draws_key)
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


def _transform(images, draws, *, info: DatasetInfo, augment: bool, cutout: int):
    """uint8 images [B, H, W, C] -> augmented, normalised float32 images."""
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

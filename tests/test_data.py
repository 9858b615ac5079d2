"""Input pipelines: TFDS (mocked and the real CIFAR-10), the built-in dataset, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from keras import layers

from keras_das.runs import data
from keras_das.runs.data import augment
from keras_das.runs.data import registry
from keras_das.runs.data import synthetic
from tests.testing import CIFAR10_DATA_DIR
from tests.testing import needs_cifar10

CIFAR10_README_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_README_STD = (0.24703223, 0.24348513, 0.26158784)


def data_config(**overrides):
    return data.default_config(**{"name": "synthetic", **overrides})


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Computed statistics go to a temporary cache, never the user's."""
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))


def first_batch(ds):
    x, y = next(iter(ds))
    return x.numpy(), y.numpy()


def pixels(x, info):
    """Normalised images back to uint8 pixels (exact when there is no cutout)."""
    raw = (x * np.asarray(info.std) + np.asarray(info.mean)) * 255.0
    np.testing.assert_allclose(raw, np.round(raw), atol=2e-3)
    return np.round(raw).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# TFDS, mocked


def test_mock_tfds_search_split_shapes_and_steps(tmp_path):
    config = data_config(name="cifar10", data_dir=str(tmp_path), train_portion=0.25)
    with tfds.testing.mock_data(num_examples=40):
        train, val, info, steps = data.search_datasets(config, 8, seed=2, epochs=2)
        batches = {"train": list(train), "val": list(val)}
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    assert (info.mean, info.std) == (CIFAR10_README_MEAN, CIFAR10_README_STD)
    assert info.num_train == 40
    assert steps == 10 // 8  # search-train has 10 examples, search-val 30
    for name, stream in batches.items():
        assert len(stream) == 2 * steps, name
        for x, y in stream:
            assert x.shape == (8, 32, 32, 3) and x.dtype == tf.float32
            assert y.shape == (8,) and y.dtype == tf.int32
            assert np.all((y.numpy() >= 0) & (y.numpy() < 10))


def test_mock_tfds_unknown_statistics_are_computed_once_and_cached(tmp_path):
    config = data_config(name="svhn_cropped", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=50):
        info = data.get_info(config)
        # Mocked images are uniform random bytes: mean 0.5, std 0.289 on pixels / 255.
        np.testing.assert_allclose(info.mean, [0.5] * 3, atol=0.03)
        np.testing.assert_allclose(info.std, [0.289] * 3, atol=0.03)
        [path] = [
            os.path.join(d, f)
            for d, _, files in os.walk(os.environ[data.CACHE_DIR_ENV])
            for f in files
        ]
        assert "svhn_cropped" in path and path.endswith(".json")
        with open(path) as f:
            stats = json.load(f)
        stats["mean"] = [0.25, 0.5, 0.75]
        with open(path, "w") as f:
            json.dump(stats, f)
        assert data.get_info(config).mean == (0.25, 0.5, 0.75)


def test_mock_tfds_test_split_is_one_ordered_pass_with_a_partial_batch(tmp_path):
    config = data_config(name="mnist", data_dir=str(tmp_path), augment=False, cutout=4)
    with tfds.testing.mock_data(num_examples=30):
        _, test, info, steps = data.train_datasets(config, 8, seed=0, epochs=1)
        assert info.image_shape == (28, 28, 1) and info.mean == data.KNOWN_STATS["mnist"][0]
        sizes = [int(y.shape[0]) for _, y in test]
        first = np.concatenate([x.numpy() for x, _ in test])
        again = np.concatenate([x.numpy() for x, _ in test])
    assert steps == 30 // 8
    assert sizes == [8, 8, 8, 6]
    np.testing.assert_array_equal(first, again)
    # Test images are neither augmented nor cut out: every pixel maps back to a byte.
    raw = pixels(first, info)
    assert raw.shape == (30, 28, 28, 1)
    assert not np.any(np.all(raw == 0, axis=(1, 2, 3)))


# ---------------------------------------------------------------------------------------
# The real CIFAR-10 (../shared/tfds)


@needs_cifar10
def test_cifar10_search_split():
    config = data_config(name="cifar10", data_dir=CIFAR10_DATA_DIR, num_examples=640)
    train, val, info, steps = data.search_datasets(config, 64, seed=2, epochs=1)
    assert info == data.DatasetInfo(
        name="cifar10",
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=CIFAR10_README_MEAN,
        std=CIFAR10_README_STD,
        num_train=640,
        num_test=10_000,
    )
    assert steps == 320 // 64
    for stream in (train, val):
        batches = list(stream)
        assert len(batches) == steps
        x, y = batches[0]
        assert x.shape == (64, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
        low = (0.0 - np.asarray(info.mean)) / np.asarray(info.std)
        high = (1.0 - np.asarray(info.mean)) / np.asarray(info.std)
        assert np.all(x.numpy() >= low - 1e-5) and np.all(x.numpy() <= high + 1e-5)
        assert set(np.unique(y.numpy())) <= set(range(10))


@needs_cifar10
def test_cifar10_statistics_match_the_data():
    """The known statistics (from the tfds README) agree with the prepared data."""
    config = data_config(name="cifar10", data_dir=CIFAR10_DATA_DIR, num_test_examples=2000)
    _, test, info, _ = data.train_datasets(config, 500, seed=0, epochs=1)
    assert (info.mean, info.std) == (CIFAR10_README_MEAN, CIFAR10_README_STD)
    x = np.concatenate([x for x, _ in test.as_numpy_iterator()])
    assert x.shape == (2000, 32, 32, 3)
    # Normalised by the training statistics, test images have mean ~0 and std ~1.
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=0.05)


@needs_cifar10
def test_cifar10_resumed_stream_sees_the_same_batches():
    config = data_config(name="cifar10", data_dir=CIFAR10_DATA_DIR, num_examples=256, cutout=16)
    full, _, _, steps = data.train_datasets(config, 64, seed=0, epochs=3)
    resumed, _, _, _ = data.train_datasets(config, 64, seed=0, initial_epoch=2, epochs=3)
    expected = list(full.skip(2 * steps).as_numpy_iterator())
    got = list(resumed.as_numpy_iterator())
    assert len(got) == steps
    for (x1, y1), (x2, y2) in zip(expected, got):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


# ---------------------------------------------------------------------------------------
# Determinism (built-in dataset: no files needed)


@pytest.mark.parametrize("function", [data.search_datasets, data.train_datasets])
def test_epoch_k_does_not_depend_on_where_the_stream_started(function):
    config = data_config(num_examples=400, cutout=8)
    k = 2
    from_zero = function(config, 32, seed=5, epochs=4)
    tf.random.set_seed(99)  # TensorFlow's global seed must not matter
    from_k = function(config, 32, seed=5, initial_epoch=k)  # open-ended
    steps = from_zero[3]
    streams = 2 if function is data.search_datasets else 1  # search: the val stream too
    for stream, resumed in zip(from_zero[:streams], from_k[:streams]):
        x1, y1 = first_batch(stream.skip(k * steps))
        x2, y2 = first_batch(resumed)
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_seeds_and_epochs_differ():
    config = data_config(num_examples=400)
    a, _, _, steps = data.train_datasets(config, 32, seed=0, epochs=2)
    b, _, _, _ = data.train_datasets(config, 32, seed=1, epochs=2)
    epoch0, epoch1 = first_batch(a), first_batch(a.skip(steps))
    assert not np.array_equal(epoch0[1], first_batch(b)[1])
    assert not np.array_equal(epoch0[1], epoch1[1])
    again, _, _, _ = data.train_datasets(config, 32, seed=0, epochs=2)
    np.testing.assert_array_equal(epoch0[0], first_batch(again)[0])


def test_search_split_is_train_portion_and_each_epoch_a_permutation():
    config = data_config(num_examples=300, train_portion=0.4, augment=False)
    train, val, info, steps = data.search_datasets(config, 20, seed=3, epochs=2)
    assert steps == min(120, 180) // 20
    images, _ = data.synthetic_images(0, "train")
    index = {hashlib.sha1(img.tobytes()).hexdigest(): i for i, img in enumerate(images[:300])}
    for stream, (low, high) in ((train, (0, 120)), (val, (120, 300))):
        batches = list(stream.as_numpy_iterator())
        assert len(batches) == 2 * steps
        seen = [
            index[hashlib.sha1(img.tobytes()).hexdigest()]
            for x, _ in batches
            for img in pixels(x, info)
        ]
        per_epoch = steps * 20
        for epoch in range(2):
            ids = seen[epoch * per_epoch : (epoch + 1) * per_epoch]
            assert len(set(ids)) == per_epoch  # no example twice in an epoch
            assert all(low <= i < high for i in ids)


# ---------------------------------------------------------------------------------------
# SearchData and TrainData: one opened dataset, the batches of search_datasets/train_datasets


def assert_same_batches(a, b, count):
    for (x1, y1), (x2, y2) in zip(a.take(count), b.take(count), strict=True):
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())


@pytest.mark.parametrize(
    "initial_epoch, epochs, seed", [(0, 2, None), (2, 4, None), (1, None, 7), (0, 1, 0)]
)
def test_search_data_streams_are_the_batches_of_search_datasets(initial_epoch, epochs, seed):
    config = data_config(num_examples=400, cutout=8, batch_size=32, train_portion=0.4)
    search = data.SearchData(config, seed=5)
    expected_seed = 5 if seed is None else seed
    train, val, info, steps = data.search_datasets(config, 32, expected_seed, initial_epoch, epochs)
    assert (search.info, search.steps_per_epoch, search.batch_size) == (info, steps, 32)
    assert steps == min(160, 240) // 32
    got = search.streams(initial_epoch, epochs, seed=seed)
    for expected, stream in zip((train, val), got, strict=True):
        assert stream.cardinality() == expected.cardinality()
        assert_same_batches(expected, stream, steps + 1)  # into the next epoch


@pytest.mark.parametrize("initial_epoch, epochs, seed", [(0, 2, None), (3, 5, None), (0, 1, 1)])
def test_train_data_streams_are_the_batches_of_train_datasets(initial_epoch, epochs, seed):
    config = data_config(num_examples=300, num_test_examples=100, cutout=4, batch_size=64)
    train_data = data.TrainData(config, seed=2)
    expected_seed = 2 if seed is None else seed
    train, test, info, steps = data.train_datasets(config, 64, expected_seed, initial_epoch, epochs)
    assert (train_data.info, train_data.steps_per_epoch) == (info, steps) and steps == 4
    got_train, got_test = train_data.streams(initial_epoch, epochs, seed=seed)
    assert_same_batches(train, got_train, steps + 1)
    assert [int(y.shape[0]) for _, y in got_test] == [64, 36]
    assert_same_batches(test, got_test, 2)


@pytest.fixture
def source_opens(monkeypatch):
    """Counts the datasets opened (a TFDS builder made, statistics read) by name."""
    opened = []
    real = registry.open_source

    def counting(data_config):
        opened.append(data_config.name)
        return real(data_config)

    monkeypatch.setattr(registry, "open_source", counting)
    return opened


@pytest.mark.parametrize("cls", [data.SearchData, data.TrainData])
def test_the_dataset_is_opened_once(cls, source_opens):
    opened = cls(data_config(num_examples=200, batch_size=16), seed=0)
    assert source_opens == ["synthetic"]
    assert opened.steps_per_epoch == (100 if cls is data.SearchData else 200) // 16
    for kwargs in ({}, {"initial_epoch": 1, "epochs": 3}, {"seed": 4}):
        for stream in opened.streams(**kwargs):
            first_batch(stream)
    assert source_opens == ["synthetic"]
    data.search_datasets(data_config(), 16, seed=0)  # the wrapper opens it for one use
    assert source_opens == ["synthetic"] * 2


def test_a_tfds_dataset_is_opened_once(tmp_path, monkeypatch):
    builders = []
    real = tfds.builder

    def counting(*args, **kwargs):
        builders.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(tfds, "builder", counting)
    config = data_config(name="cifar10", data_dir=str(tmp_path), batch_size=8)
    with tfds.testing.mock_data(num_examples=40):
        search = data.SearchData(config, seed=2)
        for initial_epoch in (0, 1):
            train, val = search.streams(initial_epoch, 2)
            assert search.steps_per_epoch == 20 // 8
            assert len(list(train)) == len(list(val)) == (2 - initial_epoch) * 2
    assert builders == ["cifar10"]


def test_search_data_reads_the_batch_size_and_checks_the_config():
    search = data.SearchData(data_config(num_examples=400, batch_size=25), seed=0)
    assert (search.batch_size, search.steps_per_epoch) == (25, 200 // 25)
    with pytest.raises(ValueError, match="64 is larger than the search-train split .*50 exam"):
        data.SearchData(data_config(num_examples=100), seed=0)
    with pytest.raises(ValueError, match="train_portion must be in"):
        data.SearchData(data_config(train_portion=1.0), seed=0)
    with pytest.raises(ValueError, match="epochs must be None or larger than initial_epoch=2"):
        data.TrainData(data_config(), seed=0).streams(initial_epoch=2, epochs=1)


def test_the_wrappers_leave_the_callers_config_alone():
    config = data_config(num_examples=400)
    data.search_datasets(config, 16, seed=0)
    data.train_datasets(config, 16, seed=0)
    assert config.batch_size == 64


# ---------------------------------------------------------------------------------------
# Augmentation


def test_crop_pads_with_black_and_flip_mirrors():
    info = data.DatasetInfo("t", 10, (6, 6, 1), (0.0,), (1.0 / 255.0,), 1, 1)
    image = np.arange(36, dtype=np.uint8).reshape(1, 6, 6, 1) + 1
    # Draw 0 -> crop offset 0 (image shifted down-right by the padding, 4); flip draw 0.9 -> no.
    out = augment.transform(
        image, tf.constant([[0.0, 0.0, 0.9, 0, 0]]), info=info, augment=True, cutout=0
    ).numpy()[0, :, :, 0]
    np.testing.assert_allclose(out[4:, 4:], image[0, :2, :2, 0], atol=1e-4)
    assert np.all(out[:4] == 0) and np.all(out[:, :4] == 0)
    # Draw 0.5 -> offset 4 (no shift); flip draw 0.1 -> mirrored.
    out = augment.transform(
        image, tf.constant([[0.5, 0.5, 0.1, 0, 0]]), info=info, augment=True, cutout=0
    ).numpy()[0, :, :, 0]
    np.testing.assert_allclose(out, image[0, :, ::-1, 0], atol=1e-4)


def test_cutout_zeroes_a_square_clipped_at_the_border():
    config = data_config(num_examples=256, augment=False)
    plain, _, info, _ = data.train_datasets(config, 256, seed=0, epochs=1)
    cut, _, _, _ = data.train_datasets(
        data_config(num_examples=256, augment=False, cutout=8), 256, seed=0, epochs=1
    )
    x, y = first_batch(plain)
    xc, yc = first_batch(cut)
    np.testing.assert_array_equal(y, yc)  # same order: cutout only zeroes pixels
    sides = set()
    for a, b in zip(x, xc):
        changed = np.any(a != b, axis=-1)
        rows, cols = np.nonzero(changed)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert changed[r0:r1, c0:c1].all()  # a filled rectangle ...
        assert changed.sum() == (r1 - r0) * (c1 - c0)
        assert np.all(b[r0:r1, c0:c1] == 0)  # ... of zeros (after normalisation)
        np.testing.assert_array_equal(a[~changed], b[~changed])
        assert r1 - r0 <= 8 and c1 - c0 <= 8
        sides.add((r1 - r0, c1 - c0))
    assert (8, 8) in sides and len(sides) > 1  # whole squares and squares cut by the border


# ---------------------------------------------------------------------------------------
# The built-in dataset


def test_synthetic_is_deterministic_by_seed_and_balanced():
    generate = synthetic._images.__wrapped__
    x0, y0 = generate(0, "train")
    x0b, y0b = generate(0, "train")
    x1, _ = generate(1, "train")
    xt, yt = generate(0, "test")
    np.testing.assert_array_equal(x0, x0b)
    np.testing.assert_array_equal(y0, y0b)
    assert not np.array_equal(x0, x1)
    assert x0.shape == (5000, 32, 32, 3) and x0.dtype == np.uint8 and xt.shape[0] == 1000
    assert np.bincount(y0).tolist() == [500] * 10 and np.bincount(yt).tolist() == [100] * 10
    info = data.get_info(data_config(num_examples=1000, num_test_examples=200))
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    assert (info.num_train, info.num_test) == (1000, 200)
    np.testing.assert_allclose(info.mean, (x0 / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)


def test_synthetic_class_is_not_in_pixel_or_global_statistics():
    x, y = data.synthetic_images(0, "train")
    x = x.astype(np.float64) / 255.0
    # The mean image and the mean colour of every class are alike (to the noise level).
    class_means = np.stack([x[y == c].mean(axis=0) for c in range(10)])
    spread = np.abs(class_means - class_means.mean(axis=0)).max(axis=(1, 2, 3))
    assert spread.max() < 0.1, spread
    per_image = x.mean(axis=(1, 2))
    colour_means = np.stack([per_image[y == c].mean(axis=0) for c in range(10)])
    assert np.ptp(colour_means, axis=0).max() < 0.01


def _tiny_net(kind):
    """A conv net and a net whose only spatial ops after the stem are pools, alike otherwise."""

    def block(x, layer):
        return layers.ReLU()(layers.BatchNormalization()(layer(x)))

    inputs = keras.Input((32, 32, 3))
    x = block(inputs, layers.Conv2D(16, 3, padding="same"))  # a stem, as in DARTS
    if kind == "conv":
        x = block(x, layers.Conv2D(32, 5, padding="same"))
        x = layers.MaxPooling2D(2)(x)
        x = block(x, layers.Conv2D(32, 3, padding="same"))
    else:
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = block(x, layers.Conv2D(32, 1))
        x = layers.AveragePooling2D(3, strides=1, padding="same")(x)
        x = block(x, layers.Conv2D(32, 1))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


@pytest.mark.slow
def test_synthetic_is_learnable_and_the_op_matters():
    config = data_config(num_examples=3000, num_test_examples=1000)
    epochs = 3
    accuracy = {}
    start = time.time()
    for kind in ("conv", "pool"):
        keras.utils.set_random_seed(0)
        train, test, _, steps = data.train_datasets(config, 64, seed=0, epochs=epochs)
        model = _tiny_net(kind)
        model.compile(
            keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(train, steps_per_epoch=steps, epochs=epochs, verbose=0)
        accuracy[kind] = model.evaluate(test, verbose=0)[1]
    print(f"test accuracy after {epochs} epochs: {accuracy} ({time.time() - start:.1f} s)")
    assert accuracy["conv"] > 0.6, accuracy
    assert accuracy["conv"] - accuracy["pool"] > 0.3, accuracy


# ---------------------------------------------------------------------------------------
# Bad input


def test_unknown_dataset_names_the_dataset_and_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"'cifar1O'.*data_dir=.*did you mean.*'cifar10'"):
        data.get_info(data_config(name="cifar1O", data_dir=str(tmp_path)))


def test_dataset_that_cannot_be_downloaded(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(ValueError, match=r"'mnist' is not prepared in data_dir=.*no network"):
        data.search_datasets(data_config(name="mnist", data_dir=str(tmp_path)), 8, seed=0)


def test_not_an_image_classification_dataset(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match="'imdb_reviews' is not an image-classification"):
            data.get_info(data_config(name="imdb_reviews", data_dir=str(tmp_path)))


@pytest.mark.parametrize("portion", [0.0, 1.0, 1.5, -0.1])
def test_train_portion_outside_0_1(portion):
    with pytest.raises(ValueError, match=f"train_portion must be in \\(0, 1\\), got {portion}"):
        data.search_datasets(data_config(train_portion=portion), 8, seed=0)


def test_batch_larger_than_the_split():
    config = data_config(num_examples=100)
    with pytest.raises(ValueError, match="64 is larger than the search-train split .*50 examples"):
        data.search_datasets(config, 64, seed=0)
    with pytest.raises(ValueError, match="128 is larger than the train split .*100 examples"):
        data.train_datasets(config, 128, seed=0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_examples": 6000}, "num_examples=6000 is larger than the 5000 examples"),
        ({"num_examples": 0}, "num_examples must be None"),
        ({"cutout": -1}, "cutout must be an int >= 0"),
    ],
)
def test_bad_config_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        data.train_datasets(data_config(**overrides), 8, seed=0)


def test_bad_epoch_range():
    with pytest.raises(ValueError, match="epochs must be None or larger than initial_epoch=3"):
        data.train_datasets(data_config(), 8, seed=0, initial_epoch=3, epochs=3)

"""TFDS image-classification datasets by name (``cifar10``, ``mnist``, ...), as sources."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from keras_das.runs.data import statistics
from keras_das.runs.data.source import DatasetInfo
from keras_das.runs.data.source import Source
from keras_das.runs.data.source import limit
from keras_das.runs.data.synthetic import SYNTHETIC


def open_source(data_config: Any) -> Source:
    """The TFDS dataset a ``data`` config names, downloaded and prepared if needed.

    Raises:
        ValueError: unknown dataset, a dataset that is not prepared and cannot be
            downloaded, not an image-classification dataset, or more examples requested
            than a split has.
    """
    name = data_config.name
    data_dir = os.path.expanduser(data_config.data_dir) if data_config.data_dir else None
    builder = _builder(name, data_dir)
    image_key, label_key = _supervised_keys(builder, name)
    examples = _examples(builder)
    available = _split_size(builder, "train", name)
    num_train = limit(available, data_config.num_examples, "num_examples", name)
    num_test = limit(
        _split_size(builder, "test", name),
        data_config.num_test_examples,
        "num_test_examples",
        name,
    )
    mean, std = _stats(builder, examples, available)
    info = DatasetInfo(
        name=name,
        num_classes=int(builder.info.features[label_key].num_classes),
        image_shape=tuple(builder.info.features[image_key].shape),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        num_train=num_train,
        num_test=num_test,
    )

    def read(split: str, start: int, stop: int) -> tf.data.Dataset:
        ds = examples(split, start, stop).batch(stop - start)
        return ds.map(lambda x, y: (x, tf.cast(y, tf.int32))).cache()

    return Source(info, read)


def _stats(builder: Any, examples: Callable, available: int) -> tuple[tuple, tuple]:
    """Known statistics, else those of the first training examples (cached once computed)."""
    if builder.name in statistics.KNOWN_STATS:  # builder.name drops a version: "cifar10:3.0.2"
        return statistics.KNOWN_STATS[builder.name]
    sample = min(available, statistics.STATS_SAMPLE_SIZE)  # whatever num_examples is
    return statistics.cached_stats(builder.info.full_name, examples("train", 0, sample))


def _examples(builder: Any) -> Callable[[str, int, int], tf.data.Dataset]:
    """``examples(split, start, stop)``: the (image, label) examples of a slice, in order."""
    read_config = tfds.ReadConfig(try_autocache=False)  # the pipelines cache the decoded split

    def examples(split: str, start: int, stop: int) -> tf.data.Dataset:
        # Under tfds.testing.mock_data every split yields the same examples whatever the
        # slice; take() makes the size right there too.
        ds = builder.as_dataset(
            split=f"{split}[{start}:{stop}]",
            as_supervised=True,
            shuffle_files=False,
            read_config=read_config,
        )
        return ds.take(stop - start)

    return examples


def _builder(name: str, data_dir: str | None) -> Any:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        close = difflib.get_close_matches(name, [SYNTHETIC, *tfds.list_builders()], n=3)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(
            f"Unknown dataset {name!r} (data_dir={data_dir!r}); expected {SYNTHETIC!r} or the "
            f"name of a TFDS image-classification dataset such as "
            f"{sorted(statistics.KNOWN_STATS)}{hint}"
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


def _supervised_keys(builder: Any, name: str) -> tuple[str, str]:
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

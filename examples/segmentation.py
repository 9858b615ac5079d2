"""Architecture search for image segmentation, on synthetic shapes generated here (offline).

Each image holds a few rectangles and discs of one random brightness on a noisy background;
its mask labels every pixel background (0), rectangle (1) or disc (2). Inside a shape a
rectangle and a disc look the same, so telling them apart needs context (corners, curved
edges): kernel size and pooling matter. A small U-shaped encoder-decoder has one MixedOp per
stage choosing among a 3x3 or 5x5 convolution, a separable convolution and max or average
pooling. The search fits the weights on the training split and the alphas on the validation
split; the chosen network is then fine-tuned on the training split and scored on held-out
images by mean IoU, next to predicting background everywhere.

    python examples/segmentation.py                      # about 2 minutes on 2 CPU cores
    python examples/segmentation.py --architect=second_order --epochs=12

The same supernet searched by the search binary (checkpoints and resume, TensorBoard, the
alpha history, the gap report, ``chosen.keras`` and its TF Serving export), with ``source``
and ``build`` below as its data and its model, then retrained from scratch:

    python -m keras_das.search --config=configs/cifar.py:smoke --workdir=/tmp/seg \
        --config.data.name=examples/segmentation.py:source --config.data.augment=False \
        --config.model.builder=examples/segmentation.py:build
    python -m keras_das.train --config=configs/cifar_train.py:smoke --workdir=/tmp/seg_train \
        --config.data.name=examples/segmentation.py:source --config.data.augment=False \
        --config.model.keras_file=/tmp/seg/chosen.keras
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import keras_das
from keras_das.runs import data

CANDIDATES = ("conv_3x3", "conv_5x5", "sep_conv_3x3", "max_pool_3x3", "avg_pool_3x3")
NUM_CLASSES = 3  # background, rectangle, disc


def make_shapes(n: int, size: int, rng: np.random.Generator):
    """Images ``[n, size, size, 1]`` (float32) and masks ``[n, size, size]`` (int32)."""
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size, 1), np.float32)
    masks = np.zeros((n, size, size), np.int32)
    lo, hi = max(2, size // 10), max(3, size // 4)
    for i in range(n):
        brightness = rng.uniform(0.5, 1.0)  # the same for both classes: only shape tells
        for _ in range(rng.integers(1, 4)):  # later shapes are painted over earlier ones
            cy, cx = rng.integers(hi, size - hi, size=2)
            if rng.random() < 0.5:
                h, w = rng.integers(lo, hi + 1, size=2)
                inside, label = (abs(yy - cy) <= h) & (abs(xx - cx) <= w), 1
            else:
                r = rng.integers(lo, hi + 1)
                inside, label = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2, 2
            masks[i][inside] = label
            images[i, ..., 0][inside] = brightness
    images += rng.normal(0.0, 0.25, images.shape).astype(np.float32)
    return images, masks


def build_supernet(size: int, width: int, channels: int = 1) -> keras.Model:
    """A U-Net-like supernet: a MixedOp at full, half and quarter resolution and one decoding."""
    inputs = keras.Input((size, size, channels))
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    full = keras_das.MixedOp(CANDIDATES, name="enc_full")(x)
    x = layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu")(full)
    half = keras_das.MixedOp(CANDIDATES, name="enc_half")(x)
    x = layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu")(half)
    x = keras_das.MixedOp(CANDIDATES, name="enc_quarter")(x)
    x = layers.Concatenate()([layers.UpSampling2D()(x), half])
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(layers.UpSampling2D()(x))
    x = keras_das.MixedOp(CANDIDATES, name="dec_full")(layers.Concatenate()([x, full]))
    return keras.Model(inputs, layers.Conv2D(NUM_CLASSES, 1)(x), name="seg_supernet")


# -- For the binaries: the shapes as a dataset, and the supernet for its DatasetInfo --------

BINARY_IMAGE_SIZE = 32
BINARY_WIDTH = 8


def source(data_config) -> data.Source:
    """The shapes as a dataset the binaries read (``--config.data.name=...:source``).

    ``data.num_examples`` / ``num_test_examples`` images (default 1000 / 500) of
    ``BINARY_IMAGE_SIZE`` pixels, drawn with ``data.synthetic_seed``; images as uint8 (the
    noisy [-0.5, 1.5] range mapped to [0, 255]) and a class per pixel.
    """
    sizes = {
        "train": data_config.num_examples or 1000,
        "test": data_config.num_test_examples or 500,
    }
    splits = {}
    for i, (split, n) in enumerate(sizes.items()):
        rng = np.random.default_rng([data_config.synthetic_seed, i])
        images, masks = make_shapes(n, BINARY_IMAGE_SIZE, rng)
        images = np.round(np.clip((images + 0.5) / 2.0, 0.0, 1.0) * 255).astype(np.uint8)
        splits[split] = (images, masks)
    pixels = splits["train"][0] / 255.0
    info = data.DatasetInfo(
        name="segmentation_shapes",
        num_classes=NUM_CLASSES,
        image_shape=(BINARY_IMAGE_SIZE, BINARY_IMAGE_SIZE, 1),
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
        num_train=sizes["train"],
        num_test=sizes["test"],
        label_shape=(BINARY_IMAGE_SIZE, BINARY_IMAGE_SIZE),
    )

    def read(split, start, stop):
        images, masks = splits[split]
        return tf.data.Dataset.from_tensors((images[start:stop], masks[start:stop]))

    return data.Source(info, read)


def build(info: data.DatasetInfo) -> keras.Model:
    """The supernet for a dataset (``--config.model.builder=...:build``): logits per pixel."""
    height, width, channels = info.image_shape
    if height != width or height % 4:
        raise ValueError(
            f"build expects square images of a side divisible by 4, got {info.image_shape}"
        )
    return build_supernet(height, BINARY_WIDTH, channels)


def mean_iou(masks: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present in either map of |pred & true| / |pred | true|."""
    ious = []
    for c in range(NUM_CLASSES):
        union = np.sum((masks == c) | (predicted == c))
        if union:
            ious.append(np.sum((masks == c) & (predicted == c)) / union)
    return float(np.mean(ious))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=1200, help="images in all splits")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16, help="channels at full resolution")
    parser.add_argument("--epochs", type=int, default=8, help="search epochs")
    parser.add_argument("--finetune_epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--architect", default="first_order",
                        choices=("first_order", "second_order", "exact"))  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # Half for the weights, a quarter for the alphas, a quarter held out for the score.
    images, masks = make_shapes(args.examples, args.image_size, rng)
    n_train, n_val = args.examples // 2, args.examples // 4
    splits = np.split(np.arange(args.examples), [n_train, n_train + n_val])
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = [(images[s], masks[s]) for s in splits]

    def dataset(x, y):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed)
        return ds.batch(args.batch_size)

    train, val = dataset(x_train, y_train), dataset(x_val, y_val)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # per pixel

    supernet = build_supernet(args.image_size, args.width)
    search = keras_das.SearchModel(supernet)
    search.build((None, args.image_size, args.image_size, 1))
    search.compile(
        # Adam and a 10x larger alpha step than DARTS's: a short search must move the alphas.
        weight_optimizer=keras.optimizers.Adam(2e-3),
        arch_optimizer=keras.optimizers.Adam(3e-3, beta_1=0.5, beta_2=0.999),
        loss=loss,
        metrics=["accuracy"],
        architect=args.architect,
    )
    paired, steps = keras_das.pair_datasets(train, val)
    search.fit(paired, steps_per_epoch=steps, epochs=args.epochs, verbose=2)

    chosen = {}
    for mix in supernet.layers:
        if isinstance(mix, keras_das.MixedOp):
            chosen[mix.name] = mix.chosen_name()
            weights = ", ".join(f"{n}={w:.2f}" for n, w in
                                zip(mix.candidate_names, mix.get_mixing_weights()))  # fmt: skip
            print(f"{mix.name:12s} -> {chosen[mix.name]:13s} ({weights})")

    model = keras_das.discretize(supernet)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    print(
        f"Fine-tuning the discretized model on the training split ({args.finetune_epochs} epochs)"
    )
    model.fit(train, epochs=args.finetune_epochs, verbose=2, shuffle=False)

    predicted = np.argmax(model.predict(x_test, batch_size=args.batch_size, verbose=0), -1)
    majority = np.bincount(y_train.ravel(), minlength=NUM_CLASSES).argmax()
    baseline = np.full_like(y_test, majority)
    results = {
        "chosen": chosen,
        "score": mean_iou(y_test, predicted),
        "baseline": mean_iou(y_test, baseline),
        "pixel_accuracy": float(np.mean(predicted == y_test)),
        "baseline_pixel_accuracy": float(np.mean(baseline == y_test)),
        "model": model,
    }
    print(
        f"Held-out mIoU {results['score']:.3f} (pixel accuracy "
        f"{results['pixel_accuracy']:.3f}); predicting class {majority} everywhere: mIoU "
        f"{results['baseline']:.3f} (pixel accuracy {results['baseline_pixel_accuracy']:.3f})"
    )
    return results


if __name__ == "__main__":
    main()

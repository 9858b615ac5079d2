"""Architecture search for keypoint regression, on synthetic blob images made here (offline).

Each image holds one bright Gaussian blob of random size and brightness in noise; the target
is its centre (x, y), normalised to [0, 1]. A searched backbone (a MixedOp at full and half
resolution choosing among 3x3 and 5x5 convolutions, a separable convolution and max or
average pooling) feeds a keypoint head: a one-channel heatmap and its soft-argmax (the
expected position under a softmax over the map), trained with a mean squared error.

Why keypoints and not detection: detection needs anchors or box matching, a variable number
of outputs and non-maximum suppression, which would outweigh the search in a short file.
A keypoint is localisation reduced to a fixed-size target and a plain MSE loss, and it still
asks what detection asks of a backbone: keep spatial information that classification
pools away. The search fits the weights on the training split and the alphas on the
validation split; the chosen network is then fine-tuned on the training split and scored on
held-out images by mean pixel error, next to always predicting the training mean.

    python examples/keypoint_regression.py                # about a minute on 2 CPU cores
    python examples/keypoint_regression.py --image_size=48 --architect=exact
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import keras_das

CANDIDATES = ("conv_3x3", "conv_5x5", "sep_conv_3x3", "max_pool_3x3", "avg_pool_3x3")


def make_blobs(n: int, size: int, rng: np.random.Generator):
    """Images ``[n, size, size, 1]`` and their blobs' centres ``[n, 2]`` as (x, y) / size."""
    centres = rng.uniform(0.1 * size, 0.9 * size, size=(n, 2)).astype(np.float32)
    sigma = rng.uniform(1.0, 2.5, size=(n, 1, 1))
    brightness = rng.uniform(0.6, 1.0, size=(n, 1, 1))
    grid = np.arange(size) + 0.5  # pixel centres
    dx = grid[None, None, :] - centres[:, 0, None, None]
    dy = grid[None, :, None] - centres[:, 1, None, None]
    images = brightness * np.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    images += rng.normal(0.0, 0.3, images.shape)
    return images[..., None].astype(np.float32), centres / size


@keras.saving.register_keras_serializable(package="examples")
class SoftArgmax2D(layers.Layer):
    """Expected (x, y) in [0, 1] under a spatial softmax of a heatmap ``[batch, h, w, 1]``."""

    def call(self, heatmap):
        _, h, w, _ = heatmap.shape
        probs = keras.ops.softmax(keras.ops.reshape(heatmap, (-1, h * w)), axis=-1)
        probs = keras.ops.reshape(probs, (-1, h, w))
        xs = (keras.ops.arange(w, dtype=probs.dtype) + 0.5) / w  # cell centres, as the targets
        ys = (keras.ops.arange(h, dtype=probs.dtype) + 0.5) / h
        x = keras.ops.sum(keras.ops.sum(probs, axis=1) * xs, axis=-1)
        y = keras.ops.sum(keras.ops.sum(probs, axis=2) * ys, axis=-1)
        return keras.ops.stack([x, y], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2)


def build_supernet(size: int, width: int) -> keras.Model:
    inputs = keras.Input((size, size, 1))
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    x = keras_das.MixedOp(CANDIDATES, name="full_res")(x)
    x = layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu")(x)
    x = keras_das.MixedOp(CANDIDATES, name="half_res_1")(x)
    x = keras_das.MixedOp(CANDIDATES, name="half_res_2")(x)
    heatmap = layers.Conv2D(1, 1)(x)
    return keras.Model(inputs, SoftArgmax2D()(heatmap), name="keypoint_supernet")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=1600, help="images in all splits")
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
    images, points = make_blobs(args.examples, args.image_size, rng)
    n_train, n_val = args.examples // 2, args.examples // 4
    splits = np.split(np.arange(args.examples), [n_train, n_train + n_val])
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = [(images[s], points[s]) for s in splits]

    def dataset(x, y):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed)
        return ds.batch(args.batch_size)

    train, val = dataset(x_train, y_train), dataset(x_val, y_val)
    loss = keras.losses.MeanSquaredError()

    supernet = build_supernet(args.image_size, args.width)
    search = keras_das.SearchModel(supernet)
    search.build((None, args.image_size, args.image_size, 1))
    search.compile(
        # Adam and a 10x larger alpha step than DARTS's: a short search must move the alphas.
        weight_optimizer=keras.optimizers.Adam(2e-3),
        arch_optimizer=keras.optimizers.Adam(3e-3, beta_1=0.5, beta_2=0.999),
        loss=loss,
        metrics=["mae"],
        architect=args.architect,
    )
    data, steps = keras_das.pair_datasets(train, val)
    search.fit(data, steps_per_epoch=steps, epochs=args.epochs, verbose=2)

    chosen = {}
    for mix in supernet.layers:
        if isinstance(mix, keras_das.MixedOp):
            chosen[mix.name] = mix.chosen_name()
            weights = ", ".join(f"{n}={w:.2f}" for n, w in
                                zip(mix.candidate_names, mix.get_mixing_weights()))  # fmt: skip
            print(f"{mix.name:10s} -> {chosen[mix.name]:13s} ({weights})")

    model = keras_das.discretize(supernet)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["mae"])
    print(
        f"Fine-tuning the discretized model on the training split ({args.finetune_epochs} epochs)"
    )
    model.fit(train, epochs=args.finetune_epochs, verbose=2, shuffle=False)

    def pixel_error(predicted):  # mean Euclidean distance to the true centre, in pixels
        return float(np.mean(np.linalg.norm(predicted - y_test, axis=-1)) * args.image_size)

    predicted = model.predict(x_test, batch_size=args.batch_size, verbose=0)
    results = {
        "chosen": chosen,
        "score": pixel_error(predicted),
        "baseline": pixel_error(np.mean(y_train, axis=0, keepdims=True)),
        "model": model,
    }
    print(
        f"Held-out mean pixel error {results['score']:.2f} px; always predicting the "
        f"training mean: {results['baseline']:.2f} px ({args.image_size}x{args.image_size} images)"
    )
    return results


if __name__ == "__main__":
    main()

"""Architecture search for sequence classification, on a synthetic token task made here (offline).

Every sequence holds token A and token B once each, at random positions, among random filler
tokens; the label says whether A comes before B. Both classes have the same tokens in the
same numbers, so a bag-of-words model is at chance by construction: only a model that sees
order can solve it (convolutions only within their receptive field, a GRU at any distance). After an embedding, two MixedOps each choose among
Keras layers: Conv1D of width 3 or 5, a dilated Conv1D, and a GRU (narrower, so a channel
adapter brings it to the common width). The search fits the weights on the training split
and the alphas on the validation split; the chosen network is then fine-tuned on the training
split and scored on held-out sequences, next to predicting the majority class.

    python examples/sequence_classification.py             # under a minute on 2 CPU cores
    python examples/sequence_classification.py --length=64 --examples=4000 --architect=exact

(``second_order`` fails here for now: its virtual step cannot take the Embedding's sparse
gradient; ``first_order`` and ``exact`` work.)
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import keras_das

TOKEN_A, TOKEN_B = 1, 2  # fillers are 3 .. vocab - 1


def make_sequences(n: int, length: int, vocab: int, rng: np.random.Generator):
    """Tokens ``[n, length]`` (int32) and labels ``[n]``: 1 where A precedes B."""
    tokens = rng.integers(3, vocab, size=(n, length)).astype(np.int32)
    positions = np.argsort(rng.random((n, length)), axis=1)[:, :2]  # two distinct positions
    rows = np.arange(n)
    tokens[rows, positions[:, 0]] = TOKEN_A
    tokens[rows, positions[:, 1]] = TOKEN_B
    return tokens, (positions[:, 0] < positions[:, 1]).astype(np.int32)


def candidates(prefix: str, width: int) -> list:
    """The ops one position may take; names are unique in the model and say what they are."""
    conv = dict(padding="same", activation="relu")
    return [
        layers.Conv1D(width, 3, name=f"{prefix}_conv3", **conv),
        layers.Conv1D(width, 5, name=f"{prefix}_conv5", **conv),
        layers.Conv1D(width, 3, dilation_rate=4, name=f"{prefix}_dilconv3_d4", **conv),
        layers.GRU(width // 2, return_sequences=True, name=f"{prefix}_gru"),
    ]


def build_supernet(length: int, vocab: int, width: int) -> keras.Model:
    inputs = keras.Input((length,), dtype="int32")
    x = layers.Embedding(vocab, width)(inputs)
    x = keras_das.MixedOp(candidates("mix1", width), name="mix1")(x)
    x = keras_das.MixedOp(candidates("mix2", width), name="mix2")(x)
    x = layers.GlobalMaxPooling1D()(x)
    return keras.Model(inputs, layers.Dense(2)(x), name="seq_supernet")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=3000, help="sequences in all splits")
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--width", type=int, default=32, help="embedding and conv channels")
    parser.add_argument("--epochs", type=int, default=8, help="search epochs")
    parser.add_argument("--finetune_epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--architect", default="first_order",
                        choices=("first_order", "second_order", "exact"))  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # Half for the weights, a quarter for the alphas, a quarter held out for the score.
    tokens, labels = make_sequences(args.examples, args.length, args.vocab, rng)
    n_train, n_val = args.examples // 2, args.examples // 4
    splits = np.split(np.arange(args.examples), [n_train, n_train + n_val])
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = [(tokens[s], labels[s]) for s in splits]

    def dataset(x, y):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed)
        return ds.batch(args.batch_size)

    train, val = dataset(x_train, y_train), dataset(x_val, y_val)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    supernet = build_supernet(args.length, args.vocab, args.width)
    search = keras_das.SearchModel(supernet)
    search.build((None, args.length))
    search.compile(
        # Adam and a 10x larger alpha step than DARTS's: a short search must move the alphas.
        weight_optimizer=keras.optimizers.Adam(2e-3),
        arch_optimizer=keras.optimizers.Adam(3e-3, beta_1=0.5, beta_2=0.999),
        loss=loss,
        metrics=["accuracy"],
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
            print(f"{mix.name} -> {chosen[mix.name]} ({weights})")

    model = keras_das.discretize(supernet)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    print(
        f"Fine-tuning the discretized model on the training split ({args.finetune_epochs} epochs)"
    )
    model.fit(train, epochs=args.finetune_epochs, verbose=2, shuffle=False)

    predicted = np.argmax(model.predict(x_test, batch_size=args.batch_size, verbose=0), -1)
    majority = np.bincount(y_train, minlength=2).argmax()
    results = {
        "chosen": chosen,
        "score": float(np.mean(predicted == y_test)),
        "baseline": float(np.mean(y_test == majority)),
        "model": model,
    }
    print(
        f"Held-out accuracy {results['score']:.3f}; predicting the majority class "
        f"({majority}): {results['baseline']:.3f}"
    )
    return results


if __name__ == "__main__":
    main()

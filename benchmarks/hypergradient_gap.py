"""How far DARTS's finite-difference hypergradient is from the exact one, on the real ops.

On smooth ops (tests/test_architect.py) the ``second_order`` estimate converges to the
``exact`` hypergradient as eps shrinks (error ~ eps^2). The DARTS ops use ReLU and
max-pooling, whose activation pattern changes between ``w + eps v`` and ``w - eps v``, so
there the two are different estimates. This prints, for a small DARTS supernet in float64,
the relative difference ``||second_order - exact|| / ||exact||`` for several eps scales,
and (for scale) how far first order is from exact.

    python benchmarks/hypergradient_gap.py
    python benchmarks/hypergradient_gap.py --cells 5 --channels 8 --batch 16 --float32
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=3)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    parser.add_argument("--seeds", type=int, default=3, help="batches/initialisations averaged")
    args = parser.parse_args()

    import keras
    import numpy as np

    keras.config.set_floatx("float32" if args.float32 else "float64")
    import keras_das

    def relative(a, b):
        a = np.concatenate([np.ravel(np.asarray(t)) for t in a])
        b = np.concatenate([np.ravel(np.asarray(t)) for t in b])
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def model(architect, fd_epsilon, seed):
        keras.utils.set_random_seed(seed)
        net = keras_das.SearchNetwork(
            num_classes=10,
            channels=args.channels,
            num_cells=args.cells,
            seed=seed,
            cell_implementation="per_edge",
        )
        search = keras_das.SearchModel(net)
        search.build((None, args.size, args.size, 3))
        search.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            architect=architect,
            fd_epsilon=fd_epsilon,
        )
        rng = np.random.default_rng(seed)
        for alpha in keras_das.arch_variables(net):
            alpha.assign(rng.normal(scale=0.3, size=alpha.shape))
        return search

    scales = (1e-1, 1e-2, 1e-3, 1e-4)
    rows = {s: [] for s in scales}
    first = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(100 + seed)
        x = rng.normal(size=(2 * args.batch, args.size, args.size, 3))
        y = rng.integers(0, 10, size=2 * args.batch)
        train = (x[: args.batch], y[: args.batch])
        val = (x[args.batch :], y[args.batch :])
        exact, _, _ = model("exact", 0.01, seed).architect(train, val)
        fo, _, _ = model("first_order", 0.01, seed).architect(train, val)
        first.append(relative(fo, exact))
        for s in scales:
            so, _, _ = model("second_order", s, seed).architect(train, val)
            rows[s].append(relative(so, exact))
    dtype = "float32" if args.float32 else "float64"
    print(
        f"DARTS ops, {args.cells} cells x {args.channels} channels, batch {args.batch}, "
        f"{args.size}x{args.size}, {dtype}, {args.seeds} seeds"
    )
    print(f"{'eps = scale / ||v||':>20} | ||second_order - exact|| / ||exact|| (mean, min..max)")
    for s in scales:
        r = rows[s]
        print(f"{s:>20g} | {np.mean(r):.3e}  ({min(r):.3e} .. {max(r):.3e})")
    print(
        f"{'first order':>20} | {np.mean(first):.3e}  (for scale: ||first_order - exact|| / ||exact||)"
    )


if __name__ == "__main__":
    main()

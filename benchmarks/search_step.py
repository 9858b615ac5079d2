"""Seconds per step, images per second and peak memory of DARTS search steps.

Sizes (32x32x3 inputs, 10 classes, the 8 DARTS ops):
  S: 5 cells, 8 channels, batch 32
  D: 8 cells, 16 channels, batch 64
Modes: the weights-only step, the first-order search step (architecture step + weight
step) and the second-order one. Each (size, mode) runs in its own process so that its
peak resident memory (ru_maxrss) is its own; "runtime" is the resident memory of that
process after importing TensorFlow and running one op, before any model exists (the
fixed cost of the TensorFlow runtime).

    python benchmarks/search_step.py                 # every size and mode
    python benchmarks/search_step.py --sizes S --modes first_order --steps 5
    python benchmarks/search_step.py --implementation per_edge   # the per-edge cells
    python benchmarks/search_step.py --sizes D --partial_channels 1 4  # PC-DARTS K=1 vs 4

``--partial_channels K`` (K > 1) runs PC-DARTS: 1/K of the channels through the ops,
with edge normalisation; it needs the per-edge cells (``auto`` picks them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "S": dict(num_cells=5, channels=8, batch=32),
    "D": dict(num_cells=8, channels=16, batch=64),
}
MODES = ("weights", "first_order", "second_order")
# quark0/darts on this machine type (torch 2.13 CPU, 2 threads): median s/step, peak GB.
REFERENCE = {
    ("S", "weights"): (1.18, 1.95),
    ("S", "first_order"): (2.35, 1.95),
    ("S", "second_order"): (7.19, 2.56),
    ("D", "weights"): (8.19, 10.5),
    ("D", "first_order"): (16.8, 10.7),
    ("D", "second_order"): (37.1, 13.9),
}


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def measure(
    size: str, mode: str, steps: int, warmup: int, implementation: str, partial_channels: int
) -> dict:
    """Runs in the child process: builds the supernet and times ``steps`` steps."""
    import numpy as np
    import tensorflow as tf

    tf.constant(1.0) + 1.0
    runtime_gb = _rss_gb()
    import keras

    import keras_das

    spec = SIZES[size]
    keras.utils.set_random_seed(0)
    net = keras_das.SearchNetwork(
        num_classes=10,
        channels=spec["channels"],
        num_cells=spec["num_cells"],
        cell_implementation=implementation,
        partial_channels=partial_channels,
        edge_normalization=partial_channels > 1,
    )
    search = keras_das.SearchModel(net)
    search.build((None, 32, 32, 3))
    search.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        architect="second_order" if mode == "second_order" else "first_order",
    )
    rng = np.random.default_rng(0)
    batch = spec["batch"]

    def data():
        x = tf.constant(rng.normal(size=(batch, 32, 32, 3)).astype("float32"))
        y = tf.constant(rng.integers(0, 10, size=batch).astype("int32"))
        return x, y

    train, val = data(), data()
    if mode == "weights":
        step = tf.function(lambda t, v: search.weight_step(*t))
    else:
        step = tf.function(lambda t, v: search.train_step((t, v)))
    start = time.perf_counter()
    step(train, val)
    trace_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step(train, val)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = step(train, val)
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "size": size,
        "mode": mode,
        "implementation": net.cell_implementation,
        "partial_channels": partial_channels,
        "s_per_step": median,
        "images_per_s": batch / median,
        "first_step_s": trace_s,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "runtime_gb": runtime_gb,
        "threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, the first traces")
    parser.add_argument(
        "--implementation",
        default="auto",
        choices=("auto", "fused", "per_edge"),
        help="the search cells: FusedSearchCell, the per-edge SearchCell, or auto (fused "
        "unless partial channels are on)",
    )
    parser.add_argument(
        "--partial_channels",
        nargs="+",
        type=int,
        default=[1],
        help="PC-DARTS K values to run (1: every channel through the ops)",
    )
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "MODE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, mode, k = args.child
        print(json.dumps(measure(size, mode, args.steps, args.warmup, args.implementation, int(k))))
        return
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    rows = []
    header = (
        f"{'size':4} {'K':>2} {'cells':8} {'mode':13} {'s/step':>8} {'img/s':>7}"
        f" {'peak GB':>8} {'runtime GB':>10} {'1st step s':>10} | {'ref s/step':>10} {'ref GB':>7}"
    )
    print(header)
    print("-" * len(header))
    runs = [(s, k, m) for s in args.sizes for k in args.partial_channels for m in args.modes]
    for size, k, mode in runs:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            size,
            mode,
            str(k),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--implementation",
            args.implementation,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode:
            print(f"{size:4} {k:2} {'':8} {mode:13} FAILED\n{result.stderr[-2000:]}")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        ref_s, ref_gb = REFERENCE[(size, mode)]
        print(
            f"{size:4} {k:2} {row['implementation']:8} {mode:13} {row['s_per_step']:8.2f}"
            f" {row['images_per_s']:7.1f} {row['peak_gb']:8.2f} {row['runtime_gb']:10.2f} {row['first_step_s']:10.1f}"
            f" | {ref_s:10.2f} {ref_gb:7.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

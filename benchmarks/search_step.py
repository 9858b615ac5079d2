"""Seconds per step, images per second, peak memory and first-step time of DARTS search
steps, on both of TensorFlow's CPU kernel paths, side by side with the official DARTS code.

Sizes (32x32x3 inputs, 10 classes, the 8 DARTS ops):
  S: 5 cells, 8 channels, batch 32
  D: 8 cells, 16 channels, batch 64
Modes: the weights-only step, the first-order search step (architecture step + weight
step), the second-order one and the exact one. Each (size, mode, kernel path) runs in its
own process so that its peak resident memory (ru_maxrss) is its own; "first step s" is the
wall time of the first step (tracing, graph optimisation and one step), paid by every run
and resume; "trace" is its tracing part, "sys" the kernel's CPU time in the first call,
mostly faulting in and zeroing the fresh memory the step touches for the first time: a
property of the machine (17-21 us per 4 KB page in one VM of benchmarks/README.md, where it
is most of the gap between the first step and the later ones, ~7 us in another).

Kernel paths (``--onednn``): ``0`` runs with ``TF_ENABLE_ONEDNN_OPTS=0`` (TensorFlow's
portable CPU kernels: what AVX2 laptops, Apple Silicon and ARM servers get), ``1`` with
oneDNN forced on (the default on CPUs with AVX-512 VNNI/BF16 or AMX). The "kernels" column
says which grouped 1x1 formulation the fused cell picked (``keras_das.space.kernels``).

With ``--peer_python`` (a Python with PyTorch) and ``--peer_dir`` (the official DARTS
``cnn/`` code), each row's peer step (same size and mode; exact has none) runs alternately
with keras_das (peer, ours, peer, ours, ... ``--rounds`` times), and the table gives the
ratio of medians: only ratios measured in one run count on a noisy machine. The peer runs
with as many threads as the processors this process may use (``taskset`` included), as
TensorFlow does.

    python benchmarks/search_step.py                 # every size and mode, oneDNN off and on
    python benchmarks/search_step.py --sizes D --modes first_order second_order --onednn 0 \
        --peer_python ../torchvenv/bin/python --peer_dir ../shared/peers/quark0-darts
    python benchmarks/search_step.py --implementation per_edge   # the per-edge cells
    python benchmarks/search_step.py --sizes D --partial_channels 1 4  # PC-DARTS K=1 vs 4
    python benchmarks/search_step.py --sizes D --modes first_order --op_profile  # by op type

Graph optimisation is the binaries' (``keras_das.runs.graph_options``: one Grappler round,
no memory or layout optimizer on CPU-only hosts); ``--graph_options default`` measures with
TensorFlow's defaults instead. Thread pools are the binaries' too
(``keras_das.runs.distribution.set_threads``: one thread per op on hosts with at most two
processors and no GPU); ``--inter_op_threads 0 --intra_op_threads 0`` measures with TensorFlow's own.
So is the CPU allocator (``distribution.set_cpu_allocator``: TensorFlow's BFC allocator where
no GPU is visible); ``--cpu_allocator default`` measures with TensorFlow's default.

``--partial_channels K`` (K > 1) runs PC-DARTS: 1/K of the channels through the ops,
with edge normalisation (on the fused cells too, as every remedy).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from keras_das.runs.distribution import usable_cpus

SIZES = {
    "S": dict(num_cells=5, channels=8, batch=32),
    "D": dict(num_cells=8, channels=16, batch=64),
}
MODES = ("weights", "first_order", "second_order", "exact")
PEER_MODES = {"weights": "weights", "first_order": "first", "second_order": "second"}


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def cpu_description() -> str:
    """The CPU model and whether it has AVX-512 (from /proc/cpuinfo)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    avx = (
        "AVX-512" if "avx512f" in flags else ("AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    )
    amx = ", AMX" if "amx_tile" in flags else ""
    used = usable_cpus()
    pinned = f", {used} used (affinity)" if used != os.cpu_count() else ""
    return f"{model} ({avx}{amx}), {os.cpu_count()} cores{pinned}"


def measure(
    size: str,
    mode: str,
    steps: int,
    warmup: int,
    implementation: str,
    partial_channels: int,
    graph: str = "short",
    threads: tuple[int, int] = (-1, -1),
    cpu_allocator: str = "auto",
    op_profile: bool = False,
) -> dict:
    """Runs in the child process: builds the supernet and times ``steps`` steps."""
    import numpy as np
    import tensorflow as tf

    from keras_das.runs import distribution

    # As the binaries do, before any op.
    allocator = distribution.set_cpu_allocator(cpu_allocator)
    threads = distribution.set_threads(*threads)

    tf.constant(1.0) + 1.0
    runtime_gb = _rss_gb()
    import keras

    import keras_das
    from keras_das.runs import graph_options
    from keras_das.space import kernels

    if graph == "short":  # as the binaries run
        graph_options.shorten_graph_optimization()

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
        architect="first_order" if mode == "weights" else mode,
    )
    rng = np.random.default_rng(0)
    batch = spec["batch"]

    def data():
        x = tf.constant(rng.normal(size=(batch, 32, 32, 3)).astype("float32"))
        y = tf.constant(rng.integers(0, 10, size=batch).astype("int32"))
        return x, y

    train, val = data(), data()
    # Without AutoGraph, as Keras's fit traces its steps: converting the package's
    # functions added about 20% to the first step's tracing that no search pays.
    if mode == "weights":
        step = tf.function(lambda t, v: search.weight_step(*t), autograph=False)
    else:
        step = tf.function(lambda t, v: search.train_step((t, v)), autograph=False)
    start = time.perf_counter()
    step.get_concrete_function(train, val)  # tracing alone
    traced = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF)
    step(train, val)  # graph optimisation, set-up and the step
    after = resource.getrusage(resource.RUSAGE_SELF)
    first_s, trace_s = time.perf_counter() - start, traced - start
    for _ in range(warmup - 1):
        step(train, val)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = step(train, val)
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    profile = _op_profile(step, train, val) if op_profile else None
    return {
        "size": size,
        "mode": mode,
        "implementation": net.cell_implementation,
        "kernels": "grouped" if kernels.grouped_conv_gradient_supported() else "blockdiag",
        "partial_channels": partial_channels,
        "graph_options": graph,
        "s_per_step": median,
        "images_per_s": batch / median,
        "first_step_s": first_s,
        "trace_s": trace_s,
        # Kernel time of the first call: mostly the first touch of the step's memory (the
        # kernel zeroes each fresh page), which later steps reuse.
        "first_call_sys_s": after.ru_stime - before.ru_stime,
        "first_call_page_faults": after.ru_minflt - before.ru_minflt,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "runtime_gb": runtime_gb,
        "cpu_allocator": allocator,
        "inter_op_threads": threads[0],
        "intra_op_threads": threads[1],
        "op_profile": profile,
    }


# Op families of a search step, by a substring of TensorFlow's op type (first match wins).
_FAMILIES = (
    ("depthwise", "depthwise convolutions"),
    ("conv2d", "dense convolutions"),
    ("matmul", "matmuls"),  # with portable kernels, the grouped 1x1 convolutions
    ("batchnorm", "batch norm"),
    ("maxpool", "max pool"),
    ("avgpool", "average pool"),
    ("spacetobatch", "dilation (space/batch)"),
    ("batchtospace", "dilation (space/batch)"),
)


def op_family(op: str) -> str:
    """The family of TensorFlow op type ``op`` (forward and gradients together)."""
    lowered = op.lower()
    return next((family for key, family in _FAMILIES if key in lowered), "other")


def _op_profile(step, *inputs) -> dict[str, float]:
    """Seconds per op type in one more step, from TensorFlow's profiler (each op's own
    time, summed over the threads that ran ops at once; tracing slows the step a little)."""
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        options = tf.profiler.experimental.ProfilerOptions(
            host_tracer_level=2, python_tracer_level=0, device_tracer_level=0
        )
        tf.profiler.experimental.start(logdir, options=options)
        try:
            step(*inputs)
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    seconds = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                # An op's event reads "node name:OpType", the runtime's own "A::B"; a
                # function call's op type is the function ("__inference_..."), whose
                # events hold its ops' (not counted twice).
                name = plane.event_metadata[event.metadata_id].name
                op = name.rsplit(":", 1)[-1].strip()
                if ":" in name and "::" not in name and not op.startswith("__"):
                    seconds[op] += event.duration_ps / 1e12
    return dict(seconds.most_common())


def _last_json(result: subprocess.CompletedProcess) -> dict | None:
    if result.returncode:
        print(f"  FAILED: {result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_peer(args, size: str, mode: str) -> dict | None:
    """One run of the official DARTS step (its own process), or None."""
    spec = SIZES[size]
    bench = args.peer_bench or os.path.join(
        os.path.dirname(os.path.abspath(args.peer_dir)), "darts_official_bench.py"
    )
    cmd = [
        args.peer_python,
        bench,
        "--darts_dir",
        args.peer_dir,
        "--layers",
        str(spec["num_cells"]),
        "--channels",
        str(spec["channels"]),
        "--batch",
        str(spec["batch"]),
        "--mode",
        PEER_MODES[mode],
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        # as many threads as the processors this process may run on (TensorFlow's own
        # choice): under taskset, PyTorch's default would oversubscribe them
        "--threads",
        str(usable_cpus()),
    ]
    return _last_json(subprocess.run(cmd, capture_output=True, text=True))


def run_ours(args, size: str, mode: str, k: int, onednn: str) -> dict | None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": onednn}
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
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
        "--graph_options",
        args.graph_options,
        "--inter_op_threads",
        str(args.inter_op_threads),
        "--intra_op_threads",
        str(args.intra_op_threads),
        "--cpu_allocator",
        args.cpu_allocator,
    ] + (["--op_profile"] if args.op_profile else [])
    return _last_json(subprocess.run(cmd, capture_output=True, text=True, env=env))


def _median(rows, key):
    values = [r[key] for r in rows if r]
    return statistics.median(values) if values else float("nan")


def print_op_profiles(rows: list[dict], top: int = 8) -> None:
    """Each row's profiled step: seconds and share per op family, then its top op types."""
    for row in rows:
        profile = row.get("op_profile")
        if not profile:
            continue
        total = sum(profile.values())
        families = collections.Counter()
        for op, seconds in profile.items():
            families[op_family(op)] += seconds
        print(
            f"\n{row['size']} {row['mode']}, oneDNN {row['onednn']} ({row['kernels']}):"
            f" {total:.2f} s of op time in the profiled step"
        )
        for family, seconds in families.most_common():
            print(f"  {family:24} {seconds:7.2f} s {100 * seconds / total:5.1f}%")
        print(
            "  top op types: "
            + ", ".join(
                f"{op} {100 * seconds / total:.1f}%" for op, seconds in list(profile.items())[:top]
            )
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, the first traces")
    parser.add_argument(
        "--onednn",
        nargs="+",
        default=["0", "1"],
        choices=["0", "1"],
        help="TF_ENABLE_ONEDNN_OPTS values to run (0: portable kernels, 1: oneDNN)",
    )
    parser.add_argument(
        "--implementation",
        default="auto",
        choices=("auto", "fused", "per_edge"),
        help="the search cells: FusedSearchCell, the per-edge SearchCell, or auto",
    )
    parser.add_argument(
        "--partial_channels",
        nargs="+",
        type=int,
        default=[1],
        help="PC-DARTS K values to run (1: every channel through the ops)",
    )
    parser.add_argument(
        "--graph_options",
        default="short",
        choices=("short", "default"),
        help="Grappler options: the binaries' (keras_das.runs.graph_options) or TF's defaults",
    )
    for pool in ("inter_op", "intra_op"):
        parser.add_argument(
            f"--{pool}_threads",
            type=int,
            default=-1,
            help="TensorFlow's thread pool: -1 the binaries' choice (distribution.set_threads),"
            " 0 TensorFlow's, N > 0 N threads",
        )
    parser.add_argument(
        "--cpu_allocator",
        default="auto",
        choices=("auto", "bfc", "default"),
        help="TensorFlow's CPU allocator: auto the binaries' choice "
        "(distribution.set_cpu_allocator), bfc, or TensorFlow's default",
    )
    parser.add_argument("--peer_python", help="a Python with PyTorch, to time official DARTS")
    parser.add_argument("--peer_dir", help="the official DARTS code (its cnn/ folder)")
    parser.add_argument(
        "--peer_bench", help="its timing harness (default: darts_official_bench.py beside it)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="peer/ours alternations per row (medians)"
    )
    parser.add_argument(
        "--op_profile",
        action="store_true",
        help="after the timed steps, profile one more step: time per op family and op type",
    )
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "MODE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, mode, k = args.child
        print(
            json.dumps(
                measure(
                    size,
                    mode,
                    args.steps,
                    args.warmup,
                    args.implementation,
                    int(k),
                    args.graph_options,
                    (args.inter_op_threads, args.intra_op_threads),
                    args.cpu_allocator,
                    args.op_profile,
                )
            )
        )
        return
    if bool(args.peer_python) != bool(args.peer_dir):
        parser.error("--peer_python and --peer_dir go together")
    print(
        f"# {cpu_description()}; {args.steps} timed steps after {args.warmup} (medians); "
        f"CPU allocator {args.cpu_allocator}"
    )
    header = (
        f"{'size':4} {'K':>2} {'oneDNN':6} {'cells':8} {'kernels':9} {'threads':7} {'mode':13}"
        f" {'s/step':>7}"
        f" {'img/s':>6} {'peak GB':>7} {'1st step s':>10} {'trace':>5} {'sys':>5}"
        f" | {'peer s':>7} {'peer GB':>7}"
        f" {'time x':>6} {'mem x':>5}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    runs = [
        (s, k, o, m)
        for s in args.sizes
        for k in args.partial_channels
        for o in args.onednn
        for m in args.modes
    ]
    for size, k, onednn, mode in runs:
        ours, peer = [], []
        for _ in range(args.rounds):
            if args.peer_python and mode in PEER_MODES:
                peer.append(run_peer(args, size, mode))
            ours.append(run_ours(args, size, mode, k, onednn))
        if not any(ours):
            print(f"{size:4} {k:2} {onednn:6} {'':8} {'':9} {'':7} {mode:13} FAILED", flush=True)
            continue
        row = dict(next(r for r in ours if r), onednn=onednn)
        for key in ("s_per_step", "peak_gb", "first_step_s", "trace_s", "first_call_sys_s"):
            row[key] = _median(ours, key)
        row["images_per_s"] = SIZES[size]["batch"] / row["s_per_step"]
        row["peer_s_per_step"] = _median(peer, "median_s")
        row["peer_peak_gb"] = _median(peer, "peak_rss_mib") / 1024
        rows.append(row)
        print(
            f"{size:4} {k:2} {onednn:6} {row['implementation']:8} {row['kernels']:9}"
            f" {row['inter_op_threads']:>3}/{row['intra_op_threads']:<3} {mode:13}"
            f" {row['s_per_step']:7.2f} {row['images_per_s']:6.1f} {row['peak_gb']:7.2f}"
            f" {row['first_step_s']:10.1f} {row['trace_s']:5.1f} {row['first_call_sys_s']:5.1f}"
            f" | {row['peer_s_per_step']:7.2f}"
            f" {row['peer_peak_gb']:7.2f} {row['s_per_step'] / row['peer_s_per_step']:6.2f}"
            f" {row['peak_gb'] / row['peer_peak_gb']:5.2f}",
            flush=True,
        )
    if args.op_profile:
        print_op_profiles(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_description(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

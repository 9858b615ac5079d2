"""Vanilla DARTS vs DARTS with remedies, and latency-constrained vs unconstrained search.

Runs real searches on CIFAR-10 (from --data_dir, else TFDS's data dir or TFDS_DATA_DIR) at a
size that takes minutes on a CPU and prints what each ended with: skip connections per cell, the
discretisation-gap report (supernet vs derived accuracy with inherited weights), and the
derived network's parameters, FLOPs and measured latency.

    python benchmarks/remedies.py collapse --workdir=/tmp/remedies     # vanilla vs remedies
    python benchmarks/remedies.py latency --workdir=/tmp/latency       # lambda 0 vs lambda > 0
    python benchmarks/remedies.py collapse --epochs 20 --examples 10000
    python benchmarks/remedies.py collapse --space s3 --epochs 30      # RobustDARTS's S3

``--space``: the 8 DARTS ops, or RobustDARTS's reduced spaces where DARTS is known to
collapse into skip connections (S2: skip_connect, sep_conv_3x3; S3: none, skip_connect,
sep_conv_3x3).

Each search is the search binary's library function with config overrides; its workdir
keeps every output (genotype.png, alphas_*.png, gap_report.json, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import cifar  # noqa: E402
from keras_das.space.primitives import DARTS_OPS  # noqa: E402

SPACES = {
    "darts": tuple(DARTS_OPS),
    "s2": ("skip_connect", "sep_conv_3x3"),
    "s3": ("none", "skip_connect", "sep_conv_3x3"),
}


def base_config(args):
    config = cifar.get_config("cifar_smoke")
    config.data.data_dir = args.data_dir  # None: TFDS's data dir (TFDS_DATA_DIR)
    config.data.num_examples = args.examples
    config.data.batch_size = args.batch
    config.epochs = args.epochs
    config.model.num_cells = args.cells
    config.model.channels = args.channels
    config.model.op_names = SPACES[args.space]
    config.arch.lr = args.arch_lr
    config.deterministic = False
    # Vanilla DARTS derives by the argmax of the alphas; DARTS-PT's selection (the default
    # config's) is measured by benchmarks/search_quality.py.
    config.remedies.perturbation.enabled = False
    return config


def variants(kind, args):
    vanilla = base_config(args)
    if kind == "collapse":
        remedied = base_config(args)
        r = remedied.remedies
        r.skip_cap.enabled = True  # P-DARTS: <= 2 skips in the normal cell
        r.param_paths.enabled = True  # every path has a parameterised op
        r.aux_skip.enabled = True  # DARTS-: auxiliary skip, beta 1 -> 0
        r.warmup.enabled = True  # PC-DARTS warm-up with alphas frozen ...
        r.warmup.epochs = max(1, args.epochs // 4)  # ... scaled to this short search
        return {"vanilla": vanilla, "remedies": remedied}
    constrained = base_config(args)
    constrained.remedies.latency.enabled = True
    constrained.remedies.latency.weight = args.latency_weight
    vanilla.remedies.latency.enabled = True  # measured and reported, weight 0
    vanilla.remedies.latency.weight = 0.0
    return {"unconstrained": vanilla, "latency": constrained}


def skip_weight(workdir):
    """The normal cell's mean skip_connect mixing weight over its edges, at the end."""
    with open(os.path.join(workdir, "alpha_history.json")) as f:
        history = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
        ops = list(json.load(f)["model"]["op_names"])
    if "skip_connect" not in ops:
        return float("nan")
    (key,) = [k for k in history["weights"] if k.endswith("normal")]
    last = history["weights"][key][-1]
    return sum(row[ops.index("skip_connect")] for row in last) / len(last)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("collapse", "latency"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cells", type=int, default=5)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--arch_lr", type=float, default=3e-4)
    parser.add_argument("--space", default="darts", choices=list(SPACES))
    parser.add_argument("--latency_weight", type=float, default=0.05)
    args = parser.parse_args()

    from keras_das import search_lib

    rows = {}
    for name, config in variants(args.kind, args).items():
        summary = search_lib.run(config, os.path.join(args.workdir, name), verbose=2)
        rows[name] = summary
    header = f"{'run':14} {'skips n/r':>9} {'skip w':>6} {'supernet':>8} {'derived':>8} {'gap':>7} {'params':>8} {'MFLOPs':>7} {'lat ms':>7} {'E[lat]':>7} {'min':>5}"
    print(header)
    print("-" * len(header))
    for name, s in rows.items():
        g = s["gap_report"]
        d = g["derived_network"]
        print(
            f"{name:14} {g['skip_connections']['normal']:>4}/{g['skip_connections']['reduce']:<4}"
            f" {skip_weight(os.path.join(args.workdir, name)):6.3f}"
            f" {g['supernet_val_accuracy']:8.4f} {g['derived_val_accuracy_inherited_weights']:8.4f}"
            f" {g['gap']:7.4f} {d['parameters']:8d} {d['flops'] / 1e6:7.1f} {d['latency_ms']:7.2f}"
            f" {g.get('expected_latency_ms', float('nan')):7.2f} {s['wall_time_s'] / 60:5.1f}"
        )
    with open(os.path.join(args.workdir, f"{args.kind}_results.json"), "w") as f:
        json.dump(
            {
                k: {
                    key: v[key]
                    for key in ("gap_report", "genotype", "wall_time_s", "final_metrics")
                    if key in v
                }
                for k, v in rows.items()
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()

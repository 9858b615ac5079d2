"""Does the search find better cells than chance? Searched, random and published genotypes,
each retrained from scratch with one proxy budget on real CIFAR-10.

    python benchmarks/search_quality.py --preset=quick --workdir=/tmp/search_quality
    python benchmarks/search_quality.py --preset=full --workdir=/tmp/search_quality_full

What it runs, each through the project's own binaries (``python -m keras_das.search`` and
``python -m keras_das.train`` with config overrides, nothing special-cased):

- searches: first order, DARTS second order, exact, first order with the collapse remedies
  on, and first order with DARTS-PT's perturbation-based selection, each for a few seeds;
- random genotypes drawn by the DARTS rule (``random:SEED``: two distinct inputs per node,
  ops uniform over the non-``none`` candidates) and the published DARTS_V1 / DARTS_V2;
- every genotype retrained from scratch for the same seeds, one genotype for more seeds to
  show the spread a single retrain has.

It is resumable and meant to be run in sittings: every finished search and retrain writes a
small record under ``--results`` (committed with the project, so a study continues on
another machine), and a rerun does only what is missing. A job interrupted half-way resumes
from its checkpoint when its ``--workdir`` is still there. ``--max_minutes`` stops starting
new jobs after that long. The table (Markdown and JSON) is rewritten after every job from
all records there are.

Data: real CIFAR-10 through TFDS, from ``--data_dir`` or TFDS's ``TFDS_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402

from keras_das import io_utils  # noqa: E402
from keras_das.runs import distribution  # noqa: E402
from keras_das.space import kernels  # noqa: E402
from keras_das.space.genotype import Genotype  # noqa: E402
from keras_das.space.genotype import get_genotype  # noqa: E402

# The architects compared by the argmax of their alphas (DARTS's derivation; DARTS-PT's
# selection, the default since this study measured it better, is its own group).
ARGMAX = "--config.remedies.perturbation.enabled=False"
ARCHITECTS = {
    "first_order": ("--config.arch.architect=first_order", ARGMAX),
    "second_order": ("--config.arch.architect=second_order", ARGMAX),
    "exact": ("--config.arch.architect=exact", ARGMAX),
    # The collapse remedies with their published settings (see benchmarks/remedies.py); the
    # warm-up keeps PC-DARTS's share of the search (15 of 50 epochs), see remedies_flags.
    "first_order+remedies": (
        "--config.arch.architect=first_order",
        ARGMAX,
        "--config.remedies.skip_cap.enabled=True",
        "--config.remedies.param_paths.enabled=True",
        "--config.remedies.aux_skip.enabled=True",
        "--config.remedies.warmup.enabled=True",
    ),
    # DARTS-PT's selection (keras_das.engine.selection) on a first-order search; 4 batches bound
    # its ~200 supernet evaluations (2 cells x 14 edges x 7 ops).
    "first_order+perturbation": (
        "--config.arch.architect=first_order",
        "--config.remedies.perturbation.enabled=True",
        "--config.remedies.perturbation.batches=4",
    ),
}
REFERENCES = ("DARTS_V1", "DARTS_V2")
# The group that searches as configs/cifar.py does by default (first order, DARTS-PT).
DEFAULT_GROUP = "first_order+perturbation"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One study: the proxy budgets and what to compare."""

    search: tuple[str, ...]  # overrides of configs/cifar.py (the search budget)
    search_epochs: int
    searches: dict  # architect label -> search seeds
    random: int  # random genotypes (random:0 .. random:N-1)
    retrain: tuple[str, ...]  # overrides of configs/cifar_train.py (the retrain budget)
    retrain_seeds: tuple[int, ...]
    spread: tuple[str, tuple[int, ...]]  # a genotype retrained for these extra seeds


PRESETS = {
    # Checks the pipeline end to end in under 30 minutes on a 2-core CPU.
    "quick": Preset(
        search=(
            "--config.data.num_examples=2000",
            "--config.data.batch_size=32",
            "--config.model.num_cells=5",
            "--config.model.channels=8",
        ),
        search_epochs=4,
        searches={"first_order": (0,)},
        random=3,
        retrain=(
            "--config.data.num_examples=2000",
            "--config.data.num_test_examples=1000",
            "--config.data.batch_size=64",
            "--config.model.num_cells=5",
            "--config.model.channels=8",
            "--config.epochs=3",
        ),
        retrain_seeds=(0,),
        spread=("DARTS_V2", ()),
    ),
    "full": Preset(
        search=(
            "--config.data.num_examples=5000",
            "--config.data.batch_size=64",
            "--config.model.num_cells=5",
            "--config.model.channels=8",
        ),
        search_epochs=10,
        searches={
            "first_order": (0, 1, 2),
            "second_order": (0, 1),
            "exact": (0, 1),
            "first_order+remedies": (0, 1),
            "first_order+perturbation": (0, 1, 2),
        },
        random=10,
        retrain=(
            "--config.data.num_examples=5000",
            "--config.data.num_test_examples=10000",
            "--config.data.batch_size=64",
            "--config.model.num_cells=5",
            "--config.model.channels=16",
            "--config.model.auxiliary=False",
            "--config.model.drop_path=0.0",
            "--config.data.cutout=0",
            "--config.epochs=8",
        ),
        retrain_seeds=(0, 1),
        spread=("DARTS_V2", (2, 3, 4)),
    ),
}


# ---------------------------------------------------------------------------------------
# Jobs: each is a binary run in its own workdir, and a record when it has finished.


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # "search" or "retrain"
    name: str  # the record's file name (no extension)
    args: tuple[str, ...]  # the binary's flags that define the job (kept in its record)
    local_args: tuple[str, ...] = ()  # flags that name this machine's files
    genotype: dict | None = None  # what a retrain trains (its record must match)

    @property
    def module(self) -> str:
        return "keras_das.search" if self.kind == "search" else "keras_das.train"


def search_jobs(preset: Preset, data_flags) -> list[Job]:
    jobs = []
    epochs = preset.search_epochs
    for label, seeds in preset.searches.items():
        flags = ("--config=configs/cifar.py", *preset.search, f"--config.epochs={epochs}")
        flags += ARCHITECTS[label]
        if "--config.remedies.warmup.enabled=True" in flags:
            flags += (f"--config.remedies.warmup.epochs={max(1, round(epochs * 15 / 50))}",)
        for seed in seeds:
            args = (*flags, f"--config.seed={seed}")
            jobs.append(Job("search", f"{label}_s{seed}", args, tuple(data_flags)))
    return jobs


def genotypes_to_retrain(preset: Preset, records: dict) -> dict:
    """Genotype id -> (the genotype, its name for the train binary or None), for every
    genotype known now: the references, the random draws and what the searches found."""
    named = [*REFERENCES, *(f"random:{i}" for i in range(preset.random))]
    out = {name: (get_genotype(name), name) for name in named}
    for name, record in records["search"].items():
        out[name] = (Genotype.from_dict(record["genotype"]), None)
    return out


def retrain_jobs(preset: Preset, records: dict, data_flags, workdir: str) -> list[Job]:
    jobs = []
    spread_name, spread_seeds = preset.spread
    for genotype_id, (genotype, name) in genotypes_to_retrain(preset, records).items():
        local = tuple(data_flags)
        if name is None:  # a searched genotype: its search record holds it
            path = os.path.join(workdir, "genotypes", f"{genotype_id}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            genotype.save(path)
            local += (f"--config.genotype={path}",)
        seeds = preset.retrain_seeds + (spread_seeds if genotype_id == spread_name else ())
        for seed in seeds:
            args = (
                "--config=configs/cifar_train.py",
                *preset.retrain,
                f"--config.seed={seed}",
                "--config.export.enabled=False",
            )
            if name is not None:
                args += (f"--config.genotype={name}",)
            job_name = f"{genotype_id.replace(':', '_')}__s{seed}"
            jobs.append(Job("retrain", job_name, args, local, genotype.to_dict()))
    return jobs


def priority(preset: Preset, job: Job) -> tuple[int, int]:
    """The order of a sitting: the default configuration's searches (``DEFAULT_GROUP``, or
    the preset's first group where it has none), then every genotype there is retrained
    with the first seed, then with the second, ..., then the other searches, then the
    spread's extra seeds; so that a study cut short still compares searched with random
    genotypes."""
    default = DEFAULT_GROUP if DEFAULT_GROUP in preset.searches else next(iter(preset.searches))
    if job.kind == "search":
        return (0, 0) if job.name.startswith(default + "_s") else (2, 0)
    seed = int(job.name.rpartition("__s")[2])
    return (1, seed) if seed in preset.retrain_seeds else (3, seed)


def run_job(job: Job, workdir: str, results: str) -> bool:
    """Runs one job's binary (resuming its workdir) and writes its record; True if it did."""
    # The workdir is named by the job's flags: a job with another budget starts afresh
    # instead of resuming this one's checkpoints.
    digest = hashlib.sha256(json.dumps([job.args, job.genotype]).encode()).hexdigest()[:8]
    job_dir = os.path.join(workdir, job.kind, f"{job.name}-{digest}")
    os.makedirs(os.path.dirname(job_dir), exist_ok=True)
    command = [sys.executable, "-m", job.module, f"--workdir={job_dir}", *job.args]
    command += job.local_args
    # The binaries run this checkout's package, whatever the interpreter has installed.
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    start = time.time()
    with open(job_dir + ".log", "a") as log:
        code = subprocess.call(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": path},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    minutes = (time.time() - start) / 60
    if code != 0:
        print(f"  FAILED ({code}) after {minutes:.1f} min: see {job_dir}.log", flush=True)
        return False
    record = {"args": list(job.args), "minutes": minutes, "environment": run_environment()}
    if job.kind == "search":
        record.update(search_record(job_dir))
    else:
        record.update(retrain_record(job_dir))
    path = os.path.join(results, job.kind, job.name + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    io_utils.atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"  done in {minutes:.1f} min", flush=True)
    return True


def run_environment() -> dict:
    """What a job's binary ran on. It inherits this process's environment on this CPU, so
    TensorFlow picks the same kernel path in it as here."""
    return {
        "tensorflow": tf.__version__,
        "onednn": kernels.onednn_enabled(),
        "cpus": distribution.usable_cpus(),
    }


def kernel_paths(records: dict) -> str:
    """How many records ran with oneDNN's CPU kernels, without them, or said nothing."""
    counts = {True: 0, False: 0, None: 0}
    for kind in ("search", "retrain"):
        for record in records[kind].values():
            counts[(record.get("environment") or {}).get("onednn")] += 1
    return (
        f"Kernels: {counts[True]} records ran with oneDNN's CPU kernels, {counts[False]} with "
        f"TensorFlow's portable ones, {counts[None]} did not record it."
    )


def search_record(job_dir: str) -> dict:
    with open(os.path.join(job_dir, "search_summary.json")) as f:
        s = json.load(f)
    gap = s.get("gap_report", {})
    return {
        "genotype": s["genotype"],
        "mixing_entropy": {k.rpartition("/")[2]: v for k, v in s["mixing_entropy"].items()},
        "max_mixing_entropy": s["max_mixing_entropy"],
        "supernet_val_accuracy": gap.get("supernet_val_accuracy"),
        "derived_val_accuracy_inherited_weights": gap.get("derived_val_accuracy_inherited_weights"),
        "search_wall_time_s": s["wall_time_s"],
    }


def retrain_record(job_dir: str) -> dict:
    with open(os.path.join(job_dir, "train_summary.json")) as f:
        s = json.load(f)
    keys = ("test_accuracy", "num_test_examples", "parameters", "flops", "latency_ms")
    return {"genotype": s["genotype"], "train_wall_time_s": s["train_wall_time_s"]} | {
        k: s[k] for k in keys
    }


def load_records(results: str, jobs_by_kind: dict | None = None) -> dict:
    """Every record under ``results``, by kind and name; a record made with other flags than
    this preset's job of that name is ignored (its budget differs)."""
    records = {"search": {}, "retrain": {}}
    for kind in records:
        folder = os.path.join(results, kind)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            with open(os.path.join(folder, name)) as f:
                record = json.load(f)
            job = (jobs_by_kind or {}).get(kind, {}).get(name[: -len(".json")])
            if job is None or (
                list(job.args) == record["args"] and job.genotype in (None, record["genotype"])
            ):
                records[kind][name[: -len(".json")]] = record
    return records


# ---------------------------------------------------------------------------------------
# The table.


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan, 0
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


def genotype_rows(preset: Preset, records: dict) -> list[dict]:
    rows = []
    for genotype_id, (genotype, _) in genotypes_to_retrain(preset, records).items():
        prefix = genotype_id.replace(":", "_") + "__s"
        runs = [r for n, r in records["retrain"].items() if n.startswith(prefix)]
        standard = [
            r
            for n, r in records["retrain"].items()
            if n.startswith(prefix) and int(n[len(prefix) :]) in preset.retrain_seeds
        ]
        search = records["search"].get(genotype_id, {})
        acc, std, n = mean_std([r["test_accuracy"] for r in standard])
        first = runs[0] if runs else {}
        rows.append(
            {
                "genotype": genotype_id,
                "group": group_of(genotype_id),
                "test_accuracy": acc,
                "test_accuracy_std": std,
                "retrains": n,
                "parameters": first.get("parameters"),
                "flops": first.get("flops"),
                "latency_ms": first.get("latency_ms"),
                "normal_skips": genotype.count("skip_connect") if genotype else None,
                "entropy_normal": search.get("mixing_entropy", {}).get("normal"),
                "entropy_reduce": search.get("mixing_entropy", {}).get("reduce"),
                "supernet_val_accuracy": search.get("supernet_val_accuracy"),
                "derived_val_accuracy": search.get("derived_val_accuracy_inherited_weights"),
            }
        )
    return rows


def group_of(genotype_id: str) -> str:
    if genotype_id in REFERENCES:
        return "reference"
    if genotype_id.startswith("random:"):
        return "random"
    return genotype_id.rsplit("_s", 1)[0]


def conclusions(preset: Preset, rows: list[dict], records: dict) -> dict:
    by_group = {}
    for row in rows:
        if row["retrains"]:
            by_group.setdefault(row["group"], []).append(row["test_accuracy"])
    groups = {g: dict(zip(("mean", "std", "n"), mean_std(v))) for g, v in by_group.items()}
    out = {"groups": groups}
    searched = {g: v for g, v in groups.items() if g in preset.searches}
    random = groups.get("random")
    if searched and random:
        best = max(searched, key=lambda g: searched[g]["mean"])
        margin = searched[best]["mean"] - random["mean"]
        out["best_architect"] = best
        out["best_minus_random"] = margin
        out["beats_random_by_2_std"] = bool(margin > 2 * random["std"])
        v2 = next((r for r in rows if r["genotype"] == "DARTS_V2" and r["retrains"]), None)
        if v2:
            out["best_minus_darts_v2"] = searched[best]["mean"] - v2["test_accuracy"]
    spread_name, spread_seeds = preset.spread
    prefix = spread_name.replace(":", "_") + "__s"
    spread = [r["test_accuracy"] for n, r in records["retrain"].items() if n.startswith(prefix)]
    mean, std, n = mean_std(spread)
    out["retrain_spread"] = {"genotype": spread_name, "mean": mean, "std": std, "n": n}
    return out


def fmt(value, spec="{:.4f}"):
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else spec.format(value)
    )


def markdown(preset_name: str, rows: list[dict], summary: dict) -> str:
    lines = [
        f"# Search quality, preset `{preset_name}`",
        "",
        "| genotype | group | test acc (mean +- std, n) | params | MFLOPs | latency ms |"
        " normal skips | entropy n/r | supernet / derived val acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["group"], r["genotype"])):
        acc = f"{fmt(r['test_accuracy'])} +- {fmt(r['test_accuracy_std'])} ({r['retrains']})"
        lines.append(
            f"| {r['genotype']} | {r['group']} | {acc} | {fmt(r['parameters'], '{:,}')} |"
            f" {fmt(r['flops'] and r['flops'] / 1e6, '{:.1f}')} | {fmt(r['latency_ms'], '{:.2f}')} |"
            f" {fmt(r['normal_skips'], '{}')} |"
            f" {fmt(r['entropy_normal'], '{:.3f}')} / {fmt(r['entropy_reduce'], '{:.3f}')} |"
            f" {fmt(r['supernet_val_accuracy'])} / {fmt(r['derived_val_accuracy'])} |"
        )
    lines += ["", "| group | mean test acc over genotypes | std | genotypes |", "|---|---|---|---|"]
    for g, v in sorted(summary["groups"].items()):
        lines.append(f"| {g} | {fmt(v['mean'])} | {fmt(v['std'])} | {v['n']} |")
    s = summary["retrain_spread"]
    lines += [
        "",
        f"Retrain spread: {s['genotype']} over {s['n']} retrain seeds: "
        f"{fmt(s['mean'])} +- {fmt(s['std'])}.",
    ]
    if "best_architect" in summary:
        lines.append(
            f"Best architect: {summary['best_architect']}, "
            f"{summary['best_minus_random']:+.4f} over the random genotypes' mean "
            f"(beats it by more than 2 std of the random draws: "
            f"{summary['beats_random_by_2_std']}); "
            f"{fmt(summary.get('best_minus_darts_v2'), '{:+.4f}')} against DARTS_V2."
        )
    return "\n".join(lines) + "\n"


def write_table(preset_name: str, preset: Preset, records: dict, results: str) -> str:
    rows = genotype_rows(preset, records)
    summary = conclusions(preset, rows, records)
    text = markdown(preset_name, rows, summary) + "\n" + kernel_paths(records) + "\n"
    io_utils.atomic_write_text(os.path.join(results, "table.md"), text)
    io_utils.atomic_write_text(
        os.path.join(results, "table.json"),
        json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n",
    )
    return text


def data_dir(flag: str | None) -> str:
    path = flag or os.environ.get("TFDS_DATA_DIR")
    if not path or not os.path.isdir(os.path.join(path, "cifar10")):
        sys.exit(
            f"CIFAR-10 for TFDS not found (--data_dir={flag!r}, TFDS_DATA_DIR="
            f"{os.environ.get('TFDS_DATA_DIR')!r}); prepare it with tfds.load('cifar10') or "
            "point one of them at a data dir that holds cifar10/"
        )
    return os.path.abspath(path)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--workdir", required=True, help="scratch: the jobs' workdirs and logs")
    parser.add_argument(
        "--results", default=None, help="records and table (default benchmarks/results/...)"
    )
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--max_minutes", type=float, default=math.inf)
    parser.add_argument("--table_only", action="store_true", help="only rewrite the table")
    parser.add_argument(
        "--first",
        nargs="*",
        default=(),
        help="job names to run before the rest, in this order (a searched genotype's "
        "retrain, NAME__sSEED, counts once its search has a record)",
    )
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    results = args.results or os.path.join(
        ROOT, "benchmarks", "results", f"search_quality_{args.preset}"
    )
    start = time.time()
    data_flags = () if args.table_only else (f"--config.data.data_dir={data_dir(args.data_dir)}",)
    failed = set()  # tried in this sitting and failed: not retried until the next one
    while not args.table_only:
        records = load_records(results)
        jobs = search_jobs(preset, data_flags) + retrain_jobs(
            preset, records, data_flags, args.workdir
        )
        records = load_records(
            results, {k: {j.name: j for j in jobs if j.kind == k} for k in ("search", "retrain")}
        )
        todo = [j for j in jobs if j.name not in records[j.kind] and j.name not in failed]
        first = list(args.first)
        todo.sort(
            key=lambda j: (
                (first.index(j.name) if j.name in first else len(first),) + priority(preset, j)
            )
        )
        print(f"{len(jobs) - len(todo)} of {len(jobs)} known jobs done", flush=True)
        if not todo or (time.time() - start) / 60 > args.max_minutes:
            break
        job = todo[0]
        print(f"{job.kind} {job.name}", flush=True)
        if not run_job(job, args.workdir, results):
            failed.add(job.name)
        write_table(args.preset, preset, load_records(results), results)
    print(write_table(args.preset, preset, load_records(results), results))


if __name__ == "__main__":
    main()

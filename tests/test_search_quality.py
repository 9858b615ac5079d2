"""The search-quality study's bookkeeping: which jobs a sitting runs, which records count,
and what the table concludes (the searches and retrains themselves are the binaries')."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import search_quality as sq  # noqa: E402

from keras_das import DARTS_V2  # noqa: E402
from keras_das.space.genotype import random_genotype  # noqa: E402

PRESET = sq.PRESETS["full"]


def _write(results, kind, name, record):
    os.makedirs(os.path.join(results, kind), exist_ok=True)
    with open(os.path.join(results, kind, name + ".json"), "w") as f:
        json.dump(record, f)


def _jobs(records, tmp_path):
    return sq.search_jobs(PRESET, ()) + sq.retrain_jobs(PRESET, records, (), str(tmp_path))


def test_a_fresh_study_plans_every_search_and_the_known_retrains(tmp_path):
    jobs = _jobs({"search": {}, "retrain": {}}, tmp_path)
    searches = [j.name for j in jobs if j.kind == "search"]
    assert len(searches) == 12 and "first_order_s2" in searches and "exact_s1" in searches
    retrains = [j.name for j in jobs if j.kind == "retrain"]
    # 10 random + 2 references, 2 seeds each, and 3 more seeds of DARTS_V2.
    assert len(retrains) == 12 * 2 + 3 and "random_9__s1" in retrains
    order = sorted(jobs, key=lambda j: sq.priority(PRESET, j))
    # The default configuration's searches first (DARTS-PT's selection), the rest after
    # the first two retrain rounds.
    assert [j.name for j in order[:3]] == [f"first_order+perturbation_s{i}" for i in range(3)]
    assert order[-4].name.startswith("first_order+remedies_s")
    assert sq.priority(sq.PRESETS["quick"], sq.search_jobs(sq.PRESETS["quick"], ())[0]) == (0, 0)
    assert order[3].name == "DARTS_V1__s0" and order[3 + 12].name == "DARTS_V1__s1"
    assert order[-1].name == "DARTS_V2__s4"
    (remedies,) = [j for j in jobs if j.name == "first_order+remedies_s0"]
    assert "--config.remedies.warmup.epochs=3" in remedies.args  # 15 of 50 epochs, of 10


def test_records_of_another_budget_or_genotype_do_not_count(tmp_path):
    results = str(tmp_path / "results")
    records = {"search": {}, "retrain": {}}
    jobs = {j.name: j for j in _jobs(records, tmp_path)}
    good = jobs["DARTS_V2__s0"]
    _write(results, "retrain", "DARTS_V2__s0", {"args": list(good.args), "genotype": good.genotype})
    stale = jobs["random_0__s0"]
    _write(
        results,
        "retrain",
        "random_0__s0",
        {"args": ["--config.epochs=1"], "genotype": stale.genotype},
    )
    other = jobs["random_1__s0"]
    _write(
        results,
        "retrain",
        "random_1__s0",
        {"args": list(other.args), "genotype": DARTS_V2.to_dict()},
    )
    by_kind = {"search": {}, "retrain": {j.name: j for j in jobs.values() if j.kind == "retrain"}}
    assert list(sq.load_records(results, by_kind)["retrain"]) == ["DARTS_V2__s0"]


def test_conclusions_compare_the_best_architect_with_the_random_draws(tmp_path):
    retrain = {}
    accuracies = {"random_0": 0.50, "random_1": 0.52, "random_2": 0.54, "DARTS_V2": 0.56}
    for name, acc in accuracies.items():
        for seed in PRESET.retrain_seeds:
            retrain[f"{name}__s{seed}"] = {"test_accuracy": acc + 0.01 * seed, "genotype": {}}
    search = {}
    for label, acc in (("first_order_s0", 0.60), ("first_order_s1", 0.58), ("exact_s0", 0.53)):
        search[label] = {"genotype": random_genotype(7).to_dict(), "mixing_entropy": {}}
        for seed in PRESET.retrain_seeds:
            retrain[f"{label}__s{seed}"] = {"test_accuracy": acc + 0.01 * seed, "genotype": {}}
    records = {"search": search, "retrain": retrain}
    rows = sq.genotype_rows(PRESET, records)
    summary = sq.conclusions(PRESET, rows, records)
    random = summary["groups"]["random"]
    assert random["mean"] == pytest.approx(0.525) and random["std"] == pytest.approx(0.02)
    assert summary["best_architect"] == "first_order"
    assert summary["best_minus_random"] == pytest.approx(0.59 + 0.005 - 0.525)
    assert summary["beats_random_by_2_std"]  # 0.07 > 2 * 0.02
    assert summary["best_minus_darts_v2"] == pytest.approx(0.595 - 0.565)
    assert "| first_order | 0.5950 |" in sq.markdown("full", rows, summary)


def test_the_table_says_which_kernels_its_records_ran_on():
    from keras_das.space import kernels

    environment = sq.run_environment()
    assert environment["onednn"] is kernels.onednn_enabled()
    assert environment["tensorflow"].count(".") >= 1
    records = {
        "search": {"a": {"environment": environment}},
        "retrain": {"b": {"environment": {"onednn": True}}, "c": {}, "d": {"environment": {}}},
    }
    line = sq.kernel_paths(records)
    on = 1 + (environment["onednn"] is True)
    off = int(environment["onednn"] is False)
    assert line == (
        f"Kernels: {on} records ran with oneDNN's CPU kernels, {off} with TensorFlow's "
        f"portable ones, {4 - on - off} did not record it."
    )

"""benchmarks/search_step.py runs (its smallest row), so that its table stays measurable."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_step_benchmark_measures_a_row():
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "search_step.py"),
            "--child",
            "S",
            "weights",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["graph_options"] == "short" and row["implementation"] == "fused"
    assert row["s_per_step"] > 0 and row["first_step_s"] >= row["s_per_step"]

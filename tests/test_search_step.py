"""benchmarks/search_step.py runs (its smallest row), so that its table stays measurable."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "search_step", os.path.join(ROOT, "benchmarks", "search_step.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


search_step = _load_benchmark()


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
            "--op_profile",
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
    # The first step taken apart: tracing, then the first call (its kernel time apart).
    assert 0 < row["trace_s"] < row["first_step_s"]
    assert row["first_call_sys_s"] >= 0 and row["first_call_page_faults"] > 0
    # One more step profiled by op type: the supernet's convolutions are among its ops.
    profile = row["op_profile"]
    assert all(seconds >= 0 for seconds in profile.values())
    assert not any("__inference" in op for op in profile), profile  # no nesting
    families = {search_step.op_family(op) for op in profile}
    assert {"depthwise convolutions", "dense convolutions", "batch norm"} <= families, profile


def test_op_families():
    assert search_step.op_family("DepthwiseConv2dNativeBackpropFilter") == "depthwise convolutions"
    assert search_step.op_family("Conv2DBackpropInput") == "dense convolutions"
    assert search_step.op_family("_MklNativeConv2D") == "dense convolutions"
    assert search_step.op_family("FusedBatchNormGradV3") == "batch norm"
    assert search_step.op_family("MaxPoolGrad") == "max pool"
    assert search_step.op_family("BatchToSpaceND") == "dilation (space/batch)"
    assert search_step.op_family("AddV2") == "other"


def test_peer_runs_with_the_processors_we_may_use(monkeypatch):
    """Under taskset the peer's PyTorch would start a thread per core of the machine and
    oversubscribe the processors it is pinned to; it gets as many threads as TensorFlow."""
    import argparse

    bench = search_step
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout='{"s_per_step": 1.0}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    args = argparse.Namespace(
        peer_python="python", peer_dir="/peers/darts/cnn", peer_bench=None, steps=2, warmup=1
    )
    assert bench.run_peer(args, "S", "first_order") == {"s_per_step": 1.0}
    cmd = seen["cmd"]
    assert cmd[cmd.index("--threads") + 1] == "1"
    assert "1 used (affinity)" in bench.cpu_description() or os.cpu_count() == 1

"""Thread pools and strategies from the ``distribution`` config section."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from keras_das.runs import distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "cpus,gpus,asked,chosen",
    [
        (2, 0, (-1, -1), (0, 1)),  # two processors: one thread per op
        (1, 0, (-1, -1), (0, 1)),
        (8, 0, (-1, -1), (0, 0)),  # more: TensorFlow's choice
        (2, 1, (-1, -1), (0, 0)),  # a GPU runs the step's ops: TensorFlow's choice
        (2, 0, (0, 0), (0, 0)),
        (8, 1, (3, 2), (3, 2)),
    ],
)
def test_thread_choice(cpus, gpus, asked, chosen, monkeypatch):
    monkeypatch.setattr(distribution, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(distribution, "_gpus", lambda: ["GPU"] * gpus)
    assert distribution.chosen_threads(*asked) == chosen


@pytest.mark.parametrize(
    "gpus,asked,chosen",
    [(0, "auto", "bfc"), (1, "auto", "default"), (1, "bfc", "bfc"), (0, "default", "default")],
)
def test_cpu_allocator_choice(gpus, asked, chosen, monkeypatch):
    monkeypatch.setattr(distribution, "_gpus", lambda: ["GPU"] * gpus)
    assert distribution.chosen_cpu_allocator(asked) == chosen


def test_bad_cpu_allocator_names_the_field_and_the_choices():
    config = ml_collections.ConfigDict(distribution.default_config().to_dict(), type_safe=False)
    config.cpu_allocator = "tcmalloc"
    with pytest.raises(
        ValueError,
        match=r"config.distribution.cpu_allocator: expected one of "
        r"\['auto', 'bfc', 'default'\], got 'tcmalloc'",
    ):
        distribution.check_config(config)


def test_a_cpu_allocator_the_user_set_stays(monkeypatch):
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "false")
    monkeypatch.delenv("TF_CPU_BFC_MEM_LIMIT_IN_MB", raising=False)
    distribution.set_cpu_allocator("bfc")
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "false"
    assert "TF_CPU_BFC_MEM_LIMIT_IN_MB" not in os.environ


def test_an_allocator_that_comes_too_late_is_reported_not_fatal(monkeypatch, caplog):
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # this process's TensorFlow is running
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    with caplog.at_level("WARNING"):
        assert distribution.set_cpu_allocator("bfc") == "bfc"
    assert "TF_CPU_ALLOCATOR_USE_BFC" not in os.environ
    assert "cpu_allocator: bfc not applied" in caplog.text


@pytest.mark.parametrize(
    "x86,gpus,env,onednn_now,asked,chosen",
    [
        (True, 0, None, False, "auto", "onednn"),  # an AVX2 x86 CPU: oneDNN's kernels
        (True, 0, None, True, "auto", "onednn"),  # AVX-512 VNNI: TensorFlow's default
        (True, 0, "0", False, "auto", "portable"),  # the user's variable decides
        (True, 0, "1", True, "auto", "onednn"),
        (True, 1, None, False, "auto", "portable"),  # a GPU host: TensorFlow's choice
        (False, 0, None, False, "auto", "portable"),  # ARM: TensorFlow's choice
        (False, 0, None, True, "auto", "onednn"),
        (True, 0, "1", True, "portable", "portable"),  # the config's field is obeyed
        (False, 0, None, False, "onednn", "onednn"),
    ],
)
def test_cpu_kernels_choice(x86, gpus, env, onednn_now, asked, chosen, monkeypatch):
    monkeypatch.setattr(distribution, "_x86", lambda: x86)
    monkeypatch.setattr(distribution, "_gpus", lambda: ["GPU"] * gpus)
    monkeypatch.setattr(distribution, "onednn_enabled", lambda: onednn_now)
    if env is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", env)
    assert distribution.chosen_cpu_kernels(asked) == chosen


def _kernels_section(name):
    config = ml_collections.ConfigDict(distribution.default_config().to_dict(), type_safe=False)
    config.cpu_kernels = name
    return config


def test_a_binary_starts_again_with_the_chosen_kernels(monkeypatch):
    monkeypatch.setattr(distribution, "_x86", lambda: True)
    monkeypatch.setattr(distribution, "_gpus", lambda: [])
    monkeypatch.setattr(distribution, "onednn_enabled", lambda: False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "keras_das.search", "--workdir=/w"])
    calls = []
    chosen = distribution.use_cpu_kernels(
        _kernels_section("auto"), execve=lambda *call: calls.append(call)
    )
    assert chosen == "onednn"
    ((path, argv, env),) = calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "keras_das.search", "--workdir=/w"]
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ  # this process's own is unchanged


def test_kernels_already_running_or_refused_start_nothing(monkeypatch, caplog):
    def fail(*call):
        raise AssertionError(f"started again: {call}")

    monkeypatch.setattr(distribution, "onednn_enabled", lambda: False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert distribution.use_cpu_kernels(_kernels_section("portable"), execve=fail) == "portable"
    # Started again with the variable, and TensorFlow still runs its portable kernels (a
    # build without oneDNN): no second start, a warning.
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    with caplog.at_level("WARNING"):
        assert distribution.use_cpu_kernels(_kernels_section("onednn"), execve=fail) == "portable"
    assert "cpu_kernels: onednn not applied" in caplog.text


def test_bad_cpu_kernels_name_the_field_and_the_choices():
    with pytest.raises(
        ValueError,
        match=r"config.distribution.cpu_kernels: expected one of "
        r"\['auto', 'onednn', 'portable'\], got 'mkl'",
    ):
        distribution.use_cpu_kernels(_kernels_section("mkl"), execve=None)
    with pytest.raises(ValueError, match=r"distribution.cpu_kernels"):
        distribution.check_config(_kernels_section("mkl"))


@pytest.mark.parametrize("bad", [-2, 1.5, True, "2", None])
def test_bad_thread_counts_name_the_field_and_the_choices(bad):
    # A section a config file writes itself (the defaults' fields are type-locked).
    config = ml_collections.ConfigDict(distribution.default_config().to_dict(), type_safe=False)
    config.intra_op_threads = bad
    with pytest.raises(
        ValueError,
        match=r"config.distribution.intra_op_threads: expected an int: "
        r"-1 \(keras_das's choice\), 0 \(TensorFlow's\) or a thread count > 0, "
        f"got {bad!r}",
    ):
        distribution.check_config(config)


_START = """
import logging, sys, tempfile
import tensorflow as tf
from configs import cifar
from keras_das.runs import experiment
config = cifar.get_config("smoke")
config.distribution.inter_op_threads = int(sys.argv[1])
config.distribution.intra_op_threads = int(sys.argv[2])
logging.basicConfig(level=logging.INFO)
experiment.Experiment.start(config, tempfile.mkdtemp())
tf.constant(1.0) + 1.0
try:  # only TensorFlow's BFC allocator counts the bytes it hands out
    allocator = "bfc" if tf.config.experimental.get_memory_info("CPU:0")["peak"] else "default"
except ValueError:  # "Allocator stats not available"
    allocator = "default"
print(allocator, tf.config.threading.get_inter_op_parallelism_threads(),
      tf.config.threading.get_intra_op_parallelism_threads())
"""


@pytest.mark.parametrize("asked", [(3, 2), (-1, -1)])
def test_the_binaries_size_the_pools_and_choose_the_allocator_before_tensorflow_starts(asked):
    # A fresh process, as a binary: the sizes hold, without a warning that TensorFlow was
    # initialised first (the binaries' imports, config and our choice must run no op).
    result = subprocess.run(
        [sys.executable, "-c", _START, *map(str, asked)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("TF_CPU_")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    allocator, inter, intra = result.stdout.split()[-3:]
    assert "not applied" not in result.stderr
    # The CPU allocator too: TensorFlow's BFC allocator where no GPU is visible.
    expected = "default" if distribution._gpus() else "bfc"
    assert allocator == expected
    assert f"CPU allocator: {expected}" in result.stderr
    assert f"TensorFlow threads: inter_op {inter}, intra_op {intra}" in result.stderr
    if asked != (-1, -1):
        assert (int(inter), int(intra)) == asked


def test_sizes_that_come_too_late_are_reported_not_fatal(caplog):
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # this process's TensorFlow is running
    current = tf.config.threading.get_intra_op_parallelism_threads()
    with caplog.at_level("WARNING"):
        chosen = distribution.set_threads(0, current + 5)
    assert chosen == (0, current + 5)
    assert tf.config.threading.get_intra_op_parallelism_threads() == current
    assert f"intra_op_threads: {current + 5} not applied" in caplog.text


def test_the_search_binary_runs_the_chosen_kernels(tmp_path, monkeypatch):
    """The README's command with no TF_ENABLE_ONEDNN_OPTS: on an x86 host without a GPU the
    search runs oneDNN's kernels, starting again with the variable where TensorFlow's
    default is its portable ones (AVX2 CPUs); elsewhere it keeps TensorFlow's choice."""
    from tests.binaries import run_binary

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    default = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tensorflow.python.util import _pywrap_util_port as p; print(p.IsMklEnabled())",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()[-1]
    workdir = tmp_path / "search"
    result = run_binary(
        "keras_das.search",
        "--config=configs/cifar.py:smoke",
        "--config.epochs=1",  # a tiny search: the choice and the start are what is tested
        "--config.data.num_examples=128",
        "--config.model.num_cells=3",
        "--config.model.channels=4",
        f"--workdir={workdir}",
    )
    ours = distribution._x86() and not distribution._gpus()  # else TensorFlow's choice
    expected = "onednn" if ours or default == "True" else "portable"
    assert f"CPU kernels: {expected}" in result.stderr, result.stderr[-3000:]
    started_again = "starting again with TF_ENABLE_ONEDNN_OPTS=1" in result.stderr
    assert started_again == (ours and default == "False"), result.stderr[-3000:]
    assert (workdir / "genotype.json").exists()

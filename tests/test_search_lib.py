"""The search binary end to end, resume after a kill, NaN handling and bad configs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

import keras_das
from configs import cifar
from keras_das.runs import data
from keras_das.runs import search_lib
from tests.binaries import ROOT
from tests.binaries import run_binary
from tests.binaries import start_binary
from tests.testing import needs_cifar10

# A space small enough for quick tests; the presets run the full 8 ops.
TINY_OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
TINY = (
    "--config.model.num_cells=3",
    "--config.model.steps=2",
    "--config.model.multiplier=2",
    "--config.model.channels=4",
    f"--config.model.op_names={TINY_OPS}",
    "--config.data.num_examples=256",
    "--config.data.batch_size=16",
)


# Big enough that, without keras_das.runs.determinism.enable_determinism, TensorFlow's AddN
# sums (the gradients of tensors that several ops read) round differently from run to
# run: the smoke preset's 5 cells (the last normal cell after both reductions is where
# it showed first), 8 channels, nodes with several outgoing edges, batch 32. Before the
# fix, 30 architecture gradients of one batch came in 3 different roundings (oneDNN) or 6
# (TF_ENABLE_ONEDNN_OPTS=0) here; with 3 or 4 cells, 20 of them all agreed.
SUMS = (
    "--config.model.steps=4",
    "--config.model.multiplier=4",
    "--config.model.channels=8",
    "--config.model.op_names=('none', 'skip_connect', 'sep_conv_3x3', 'sep_conv_5x5')",
    "--config.data.num_examples=512",
    "--config.data.batch_size=32",
    "--config.remedies.gap_report.enabled=False",
    "--config.remedies.perturbation.enabled=False",  # about the search's own sums
)


def tiny_config(**changes):
    config = cifar.get_config("smoke")
    config.model.num_cells, config.model.steps, config.model.multiplier = 3, 2, 2
    config.model.channels, config.model.op_names = 4, TINY_OPS
    config.data.num_examples, config.data.batch_size = 256, 16
    config.epochs = 2
    for field, value in changes.items():
        section, _, name = field.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config


def check_search_workdir(workdir, epochs):
    """Every output of a finished search exists and parses."""
    genotype = keras_das.Genotype.load(os.path.join(workdir, "genotype.json"))
    for epoch in range(1, epochs + 1):
        assert keras_das.Genotype.load(
            os.path.join(workdir, "genotypes", f"epoch_{epoch:03d}.json")
        )
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["epochs"] == epochs
    with open(os.path.join(workdir, "alpha_history.json")) as f:
        history = json.load(f)
    assert history["epochs"] == list(range(epochs))
    with open(os.path.join(workdir, "search_summary.json")) as f:
        summary = json.load(f)
    # The history holds each epoch's argmax; DARTS-PT's selection (the default) may differ.
    argmax = keras_das.Genotype.from_dict(summary.get("argmax_genotype", summary["genotype"]))
    assert keras_das.Genotype.from_dict(history["genotypes"][-1]) == argmax
    assert keras_das.Genotype.from_dict(summary["genotype"]) == genotype
    assert 0.0 <= summary["final_metrics"]["arch_val_accuracy"] <= 1.0
    assert sorted(name.rpartition("/")[2] for name in summary["mixing_entropy"]) == [
        "normal",
        "reduce",
    ]
    for value in summary["mixing_entropy"].values():
        assert 0.0 <= value <= summary["max_mixing_entropy"] + 1e-6
    for png in ("genotype.png", "alphas_normal.png", "alphas_reduce.png"):
        with open(os.path.join(workdir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    with open(os.path.join(workdir, "checkpoints", "latest.json")) as f:
        assert json.load(f)["epoch"] == epochs
    tags = set()
    for root, _, files in os.walk(os.path.join(workdir, "tensorboard")):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags.update(v.tag for v in event.summary.value)
    for tag in (
        "epoch_loss",
        "epoch_accuracy",
        "epoch_arch_val_accuracy",
        "epoch_learning_rate",
        "epoch_arch_learning_rate",
        "mixing_weights/normal/0_to_2/sep_conv_3x3",
    ):
        assert tag in tags, (tag, sorted(tags)[:20])
    leftovers = [f for _, _, files in os.walk(workdir) for f in files if f.startswith(".")]
    assert not leftovers, leftovers  # no temporary files from atomic writes
    return summary


@pytest.mark.e2e
def test_search_binary_smoke_preset(tmp_path):
    workdir = str(tmp_path / "search")
    run_binary("keras_das.search", "--config=configs/cifar.py:smoke", f"--workdir={workdir}")
    summary = check_search_workdir(workdir, cifar.get_config("smoke").epochs)
    assert summary["resumed_from_epoch"] == 0
    # The search decides: the normal cell's mixing weights moved away from uniform (ln 8 =
    # 2.079; measured 1.74-1.83 over four runs) toward what the built-in data rewards, ops
    # that see 5+ pixels (convolutions, 7 or 8 of 8 edges in each), not pools or skips.
    (normal,) = [v for k, v in summary["mixing_entropy"].items() if k.endswith("normal")]
    assert normal < 1.9, summary["mixing_entropy"]
    convs = [op for op, _ in summary["genotype"]["normal"] if "conv" in op]
    assert len(convs) >= 6, summary["genotype"]["normal"]


@pytest.mark.e2e
@needs_cifar10
def test_search_binary_on_real_cifar10(tmp_path):
    """The cifar_smoke preset on a tiny supernet, fewer images and epochs (the README's main
    command runs the whole smoke preset's supernet in the test above; this one is about the
    TFDS path, DARTS-PT's selection and the gap report on real images)."""
    workdir = str(tmp_path / "search")
    run_binary(
        "keras_das.search",
        "--config=configs/cifar.py:cifar_smoke",
        f"--workdir={workdir}",
        *TINY,
        "--config.epochs=2",
        "--config.remedies.perturbation.batches=1",  # DARTS-PT, on fewer batches
    )
    check_search_workdir(workdir, 2)


@pytest.mark.e2e
def test_search_under_mirrored_strategy_on_two_cpus(tmp_path):
    workdir = str(tmp_path / "search")
    run_binary(
        "keras_das.search",
        "--config=configs/cifar.py:smoke",
        f"--workdir={workdir}",
        *TINY,
        "--config.epochs=1",
        "--config.distribution.strategy=mirrored",
        "--config.distribution.cpu_devices=2",
    )
    check_search_workdir(workdir, 1)


def _final_state(workdir):
    path = os.path.join(
        workdir,
        "checkpoints",
        json.load(open(os.path.join(workdir, "checkpoints", "latest.json")))["file"],
    )
    with np.load(path) as ckpt:
        paths = json.loads(str(ckpt["__paths__"]))
        return {paths[k]: ckpt[k] for k in paths}


@pytest.mark.e2e
@pytest.mark.kernel_path
def test_killed_search_resumes_to_the_same_alphas(tmp_path):
    args = (
        "--config=configs/cifar.py:smoke",
        *SUMS,  # sums of gradients that depend on thread timing without the fix
        "--config.epochs=3",
        "--config.deterministic=True",
    )
    straight = str(tmp_path / "straight")
    run_binary("keras_das.search", *args, f"--workdir={straight}")

    killed = str(tmp_path / "killed")
    process = start_binary(
        "keras_das.search", *args, f"--workdir={killed}", log_path=str(tmp_path / "log")
    )
    latest = os.path.join(killed, "checkpoints", "latest.json")
    deadline = time.time() + 600
    while not os.path.exists(latest) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, open(tmp_path / "log").read()[-3000:]
    time.sleep(1.0)  # into the second epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.load(open(latest))["epoch"] < 3

    run_binary("keras_das.search", *args, f"--workdir={killed}")
    summary = check_search_workdir(killed, 3)
    assert summary["resumed_from_epoch"] >= 1
    assert (
        open(os.path.join(killed, "genotype.json")).read()
        == open(os.path.join(straight, "genotype.json")).read()
    )
    a, b = _final_state(straight), _final_state(killed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# Computes the architecture gradient of one batch (first order: the backward pass of the
# whole supernet) repeatedly in one process; prints how many different results it got.
REPEATED_ARCH_GRADIENTS = """
import hashlib, sys
import tensorflow as tf
from absl import flags
from ml_collections import config_flags
from keras_das.runs import data, determinism, search_lib

config_flag = config_flags.DEFINE_config_file("config", lock_config=True)
flags.FLAGS(sys.argv[:1] + sys.argv[2:])
config = config_flag.value
determinism.set_seeds(config.seed, config.deterministic)
search_data = data.SearchData(config.data, config.seed)
plan = search_lib.validate_config(config)
search = search_lib.build_search_model(config, search_data.info, search_data.steps_per_epoch, plan)
train, val = search_data.streams()
batches = next(iter(train)), next(iter(val))
arch_gradients = tf.function(lambda: search.architect(*batches)[0])
digests = set()
for _ in range(int(sys.argv[1])):
    digests.add(hashlib.sha256(b"".join(g.numpy().tobytes() for g in arch_gradients())).hexdigest())
print(len(digests))
"""


@pytest.mark.kernel_path
def test_deterministic_mode_repeats_the_architecture_gradient_bit_for_bit():
    """TensorFlow's AddN kernel orders its sum by which input buffer it can reuse, i.e. by
    thread timing; deterministic mode must keep such sums out of the gradients."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(REPEATED_ARCH_GRADIENTS),
            "30",
            "--config=configs/cifar.py:smoke",
            "--config.deterministic=True",
            *SUMS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "1"  # one result in 30 calls


@pytest.mark.e2e
@pytest.mark.kernel_path
def test_deterministic_searches_in_two_processes_end_bit_identical(tmp_path):
    args = ("--config=configs/cifar.py:smoke", *SUMS, "--config.epochs=1")
    workdirs = [str(tmp_path / name) for name in ("first", "second")]
    for workdir in workdirs:  # each process with its own PYTHONHASHSEED
        run_binary("keras_das.search", *args, "--config.deterministic=True", f"--workdir={workdir}")
    first, second = (_final_state(workdir) for workdir in workdirs)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    genotypes = [open(os.path.join(w, "genotype.json")).read() for w in workdirs]
    assert genotypes[0] == genotypes[1]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = data.SearchData.streams

    def poisoned(self, initial_epoch=0, epochs=None, seed=None):
        train, val = real(self, initial_epoch, epochs, seed)
        bad_step = (1 - initial_epoch) * self.steps_per_epoch + 2  # epoch 2 (index 1), step 3

        def poison(i, batch):
            x, y = batch
            return tf.where(i >= bad_step, x * np.nan, x), y

        return train.enumerate().map(poison), val

    monkeypatch.setattr(data.SearchData, "streams", poisoned)
    workdir = str(tmp_path / "nan")
    with pytest.raises(
        FloatingPointError, match=r"became nan at epoch 2, step 3 \(global step \d+\).*ckpt-00001"
    ):
        search_lib.run(tiny_config(epochs=3), workdir, verbose=0)
    assert json.load(open(os.path.join(workdir, "checkpoints", "latest.json")))["epoch"] == 1
    # The good epoch's genotype is kept; genotype.json is written when a search ends.
    assert keras_das.Genotype.load(os.path.join(workdir, "genotypes", "epoch_001.json"))
    assert not os.path.exists(os.path.join(workdir, "genotype.json"))


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "model.op_names",
            ("none", "sep_conv_9x9"),
            r"config.model.op_names: Unknown op 'sep_conv_9x9'; expected one of",
        ),
        (
            "model.relaxation",
            "argmax",
            r"config.model.relaxation: Unknown relaxation 'argmax'; expected one of \['softmax'",
        ),
        (
            "arch.architect",
            "third_order",
            r"config.arch.architect: Unknown architect 'third_order'; expected one of \['first_order'",
        ),
        (
            "distribution.strategy",
            "horovod",
            r"config.distribution.strategy: Unknown distribution.strategy 'horovod'; expected one of \['none'",
        ),
        (
            "distribution.intra_op_threads",
            -2,
            r"config.distribution.intra_op_threads: expected an int: -1 \(keras_das's choice\)",
        ),
        ("model.num_cells", 0, r"config.model.num_cells must be a positive int, got 0"),
        ("model.multiplier", 5, r"config.model.multiplier=5 exceeds config.model.steps=2"),
        ("epochs", -1, r"config.epochs must be a positive int, got -1"),
        ("data.train_portion", 1.5, r"data.train_portion must be in \(0, 1\), got 1.5"),
        ("data.name", "cifar11", r"cifar11"),
        ("data.batch_size", 100000, r"batch"),
        (
            "arch.lr_reference_steps",
            -5,
            r"config.arch.lr_reference_steps must be an int >= 0 \(0: no scaling\), got -5",
        ),
    ],
)
def test_bad_configs_fail_before_training(field, value, message, tmp_path):
    workdir = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=message):
        search_lib.run(tiny_config(**{field: value}), workdir, verbose=0)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_arch_learning_rate_scales_up_short_searches():
    config = cifar.get_config()  # the paper: 50 epochs of 391 steps at 3e-4

    def lr(steps):
        frozen = search_lib.validate_config(config).frozen_epochs
        return search_lib.arch_learning_rate(config, steps, frozen)

    assert lr(391) == pytest.approx(3e-4)
    assert lr(2 * 391) == 3e-4  # longer: unchanged
    config.epochs = 5
    assert lr(391) == pytest.approx(3e-3)
    config.remedies.warmup.enabled, config.remedies.warmup.epochs = True, 4  # alphas frozen
    assert lr(391) == pytest.approx(1.5e-2)
    config.arch.lr_reference_steps = 0
    assert lr(391) == 3e-4


def test_bad_config_from_the_command_line_names_the_field(tmp_path):
    result = run_binary(
        "keras_das.search",
        "--config=configs/cifar.py:smoke",
        f"--workdir={tmp_path}",
        "--config.arch.architect=zeroth_order",
        check=False,
        timeout=300,
    )
    assert result.returncode != 0
    assert "config.arch.architect: Unknown architect 'zeroth_order'" in result.stderr
    typo = run_binary(
        "keras_das.search",
        "--config=configs/cifar.py:smoke",
        f"--workdir={tmp_path}",
        "--config.arch.architekt=first_order",
        check=False,
        timeout=300,
    )
    assert typo.returncode != 0 and "architect" in typo.stderr  # locked config suggests the field


def test_search_with_every_remedy_on_writes_the_gap_report(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_DAS_CACHE_DIR", str(tmp_path / "cache"))
    config = tiny_config(epochs=3)
    r = config.remedies
    for name in (
        "skip_cap",
        "param_paths",
        "aux_skip",
        "warmup",
        "partial_channels",
        "latency",
        "perturbation",
    ):
        r[name].enabled = True
    r.warmup.epochs, r.partial_channels.k, r.perturbation.batches = 1, 2, 2
    r.temperature.schedule, r.temperature.start, r.temperature.end = "exponential", 4.0, 1.0
    workdir = str(tmp_path / "search")
    summary = search_lib.run(config, workdir, verbose=0)
    report = json.load(open(os.path.join(workdir, "gap_report.json")))
    assert report == summary["gap_report"]
    assert report["gap"] == pytest.approx(
        report["supernet_val_accuracy"] - report["derived_val_accuracy_inherited_weights"]
    )
    assert report["skip_connections"]["normal"] <= 2  # the cap holds for DARTS-PT's choice
    genotype = keras_das.Genotype.load(os.path.join(workdir, "genotype.json"))
    assert summary["genotype"] == genotype.to_dict() and "argmax_genotype" in summary
    assert summary["perturbation_selection_s"] > 0
    assert report["derived_network"]["latency_ms"] > 0 and report["expected_latency_ms"] > 0
    assert summary["final_metrics"]["temperature"] == pytest.approx(1.0)
    assert os.listdir(tmp_path / "cache" / "latency")  # the measured table is cached


def test_early_stop_ends_the_search_and_a_rerun_does_not_continue(tmp_path):
    config = tiny_config(epochs=4)
    config.remedies.early_stop.enabled = True
    config.remedies.early_stop.max_skips = 1  # any skip in the derived normal cell
    config.model.op_names = ("none", "skip_connect", "max_pool_3x3")  # skips are likely
    workdir = str(tmp_path / "search")
    first = search_lib.run(config, workdir, verbose=0)
    assert first["early_stop"]["epoch"] < 4 and "skip connections" in first["early_stop"]["reason"]
    stopped = json.load(open(os.path.join(workdir, "checkpoints", "latest.json")))["epoch"]
    assert stopped == first["early_stop"]["epoch"]
    again = search_lib.run(config, workdir, verbose=0)
    assert again["early_stop"] == first["early_stop"] and again["resumed_from_epoch"] == stopped

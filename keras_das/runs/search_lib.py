"""An architecture search from a config to a workdir (what ``python -m keras_das.search`` runs).

What is searched is the DARTS cell space, or the user's own Keras model with MixedOps
(``--config.model.builder=package.module:function``); ``keras_das.runs.spaces`` holds the
two. Workdir outputs of a cell search, each written atomically:

    config.json                the resolved config
    genotype.json              the derived genotype, written when the search ends
    genotypes/epoch_NNN.json   the genotype after each epoch
    genotype.png               both cells as graphs
    alpha_history.json         every owner's mixing weights after each epoch
    alphas_normal.png, alphas_reduce.png   how each edge's mixing weights moved
    tensorboard/               losses, accuracies, learning rates, per-edge mixing weights
    checkpoints/               everything needed to resume (see keras_das.runs.checkpoint)
    search_summary.json        final metrics, wall time, the genotype
    gap_report.json            supernet vs the derived network (remedies.gap_report)

A user model's search writes ``chosen.json`` (each MixedOp's op), ``chosen.keras`` (the
discretized model, with the weights it inherits), ``export/1/`` (it, for TF Serving) and
``alphas/<MixedOp>.png`` instead of the genotype files; its ``alpha_history.json`` and
TensorBoard mixing weights are per MixedOp, by name.

Running the same command again on the same workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import keras

from keras_das import io_utils
from keras_das.engine import architect as architect_lib
from keras_das.engine import remedies as remedies_lib
from keras_das.engine.schedules import EpochCosineDecay
from keras_das.engine.search_model import SearchModel
from keras_das.engine.search_model import pair_datasets
from keras_das.runs import callbacks as callbacks_lib
from keras_das.runs import config_fields
from keras_das.runs import data
from keras_das.runs import distribution
from keras_das.runs import experiment
from keras_das.runs import spaces
from keras_das.space import primitives
from keras_das.space import relaxations


def validate_config(config) -> remedies_lib.RemedyPlan:
    """Raises a ValueError naming the field, the bad value and the valid choices; returns
    the plan of the remedies section (``keras_das.engine.remedies.plan`` checks it)."""
    config_fields.check_field("model.op_names", primitives.check_op_names, config.model.op_names)
    if len(config.model.op_names) < 2:
        raise ValueError(
            f"config.model.op_names needs at least 2 ops, got {config.model.op_names!r}"
        )
    config_fields.check_field(
        "model.relaxation",
        relaxations.check_relaxation,
        config.model.relaxation,
        len(config.model.op_names),
    )
    config_fields.check_field(
        "model.temperature", relaxations.check_temperature, config.model.temperature
    )
    config_fields.check_field(
        "arch.architect", architect_lib.check_architect, config.arch.architect
    )
    distribution.check_config(config.distribution)
    _check_sizes(config)
    return remedies_lib.plan(config.remedies, config.epochs, config.model.relaxation)


def _check_sizes(config) -> None:
    config_fields.check_positive(
        config,
        "epochs",
        "data.batch_size",
        "model.channels",
        "model.num_cells",
        "model.steps",
        "model.multiplier",
        "model.stem_multiplier",
        "steps_per_execution",
        "checkpoint_every_epochs",
    )
    config_fields.check_positive(config, "optimizer.lr", "arch.lr", integer=False)
    if not (
        isinstance(config.arch.lr_reference_steps, int) and config.arch.lr_reference_steps >= 0
    ):
        raise ValueError(
            "config.arch.lr_reference_steps must be an int >= 0 (0: no scaling), got "
            f"{config.arch.lr_reference_steps!r}"
        )
    if config.model.multiplier > config.model.steps:
        raise ValueError(
            f"config.model.multiplier={config.model.multiplier} exceeds config.model.steps="
            f"{config.model.steps} (a cell concatenates at most all its nodes)"
        )
    if not 0 <= config.optimizer.lr_min <= config.optimizer.lr:
        raise ValueError(
            f"config.optimizer.lr_min must be in [0, lr={config.optimizer.lr}], got {config.optimizer.lr_min!r}"
        )
    if config.remedies.partial_channels.enabled:
        k = config.remedies.partial_channels.k
        if isinstance(k, int) and k > 0 and config.model.channels % k:
            raise ValueError(
                f"config.remedies.partial_channels.k={k} must divide "
                f"config.model.channels={config.model.channels}"
            )
    if config.optimizer.grad_clip is not None and not config.optimizer.grad_clip > 0:
        raise ValueError(
            f"config.optimizer.grad_clip must be > 0 or None, got {config.optimizer.grad_clip!r}"
        )


def build_search_model(
    config,
    info: data.DatasetInfo,
    steps_per_epoch: int,
    remedies: remedies_lib.RemedyPlan,
    space=None,
) -> SearchModel:
    """The supernet and its SearchModel, compiled as the config says (call under the
    strategy); ``remedies`` is the config's ``RemedyPlan`` (``validate_config`` returns it)
    and ``space`` what is searched (default: ``spaces.from_config``)."""
    space = space or spaces.from_config(config, remedies)
    net = space.build(info)
    search = SearchModel(net)
    search.build((None, *info.image_shape))
    lr = EpochCosineDecay(
        config.optimizer.lr, config.epochs, steps_per_epoch, config.optimizer.lr_min
    )
    search.compile(
        weight_optimizer=keras.optimizers.SGD(lr, momentum=config.optimizer.momentum),
        arch_optimizer=keras.optimizers.Adam(
            arch_learning_rate(config, steps_per_epoch, remedies.frozen_epochs),
            beta_1=config.arch.beta_1,
            beta_2=config.arch.beta_2,
            epsilon=1e-8,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        architect=config.arch.architect,
        weight_decay=config.optimizer.weight_decay,
        arch_weight_decay=config.arch.weight_decay,
        grad_clip=config.optimizer.grad_clip,
        arch_penalties=remedies.penalties(space.latency_tables(net, info.image_shape)),
        freezable_arch=remedies.freezable_arch,
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    return search


def arch_learning_rate(config, steps_per_epoch: int, frozen_epochs: int) -> float:
    """``arch.lr``, scaled up for searches shorter than ``arch.lr_reference_steps`` steps.

    Adam moves each alpha by about its learning rate per step whatever the gradient's
    scale, so how far the alphas can travel in a search is about lr x its architecture
    steps. DARTS's 3e-4 was set for 50 epochs of 391 steps (19550); a search of N < 19550
    steps gets ``lr * 19550 / N`` so that they can travel as far, and a longer one keeps
    ``lr``. Without it, a search of a few hundred steps ends with the mixing weights still
    uniform and a genotype decided by noise. ``lr_reference_steps=0`` turns it off.
    ``frozen_epochs`` (PC-DARTS's warm-up: ``RemedyPlan.frozen_epochs``) do not count.
    """
    reference = config.arch.lr_reference_steps
    arch_steps = max(1, (config.epochs - frozen_epochs) * steps_per_epoch)
    return config.arch.lr * max(1.0, reference / arch_steps) if reference else config.arch.lr


def run(config, workdir: str, verbose: int | str = "auto") -> dict:
    """Searches as ``config`` says, writing to ``workdir``; resumes from its checkpoint.

    Returns:
        The summary also written to ``search_summary.json``.

    Raises:
        ValueError: an invalid config (before any training).
        FloatingPointError: the loss became NaN (the last good checkpoint is kept).
    """
    remedies = validate_config(config)
    space = spaces.from_config(config, remedies)  # a user model's builder is imported here
    exp = experiment.Experiment.start(config, workdir)
    search_data = data.SearchData(config.data, config.seed)  # a bad dataset fails here
    exp.open_workdir()
    with exp.strategy.scope():
        search = build_search_model(
            config, search_data.info, search_data.steps_per_epoch, remedies, space
        )
    initial_epoch = exp.restore(
        {
            "supernet": search.supernet,
            "weight_optimizer": search.weight_optimizer,
            "arch_optimizer": search.arch_optimizer,
        }
    )
    start = time.time()
    summary = {"epochs": config.epochs, "resumed_from_epoch": initial_epoch}
    history = search_history(exp, initial_epoch)
    summary.update(fit(exp, search, search_data, remedies, space, history, initial_epoch, verbose))
    summary["wall_time_s"] = time.time() - start
    summary.update(space.finish(exp, search, search_data, history))
    exp.write_summary("search_summary.json", summary)
    return summary


def search_history(exp, initial_epoch: int) -> callbacks_lib.MixingWeightsHistory:
    """The run's ``MixingWeightsHistory`` (continued from ``alpha_history.json`` on a
    resume; written there by the chief): it derives each epoch's genotype once, and the
    artifacts, DARTS+'s early stop and the end of the run read it."""
    path = os.path.join(exp.workdir, "alpha_history.json")
    previous = (
        callbacks_lib.MixingWeightsHistory.load(path)
        if initial_epoch and os.path.exists(path)
        else None
    )
    return callbacks_lib.MixingWeightsHistory(path if exp.chief else None, initial=previous)


def fit(exp, search, search_data, remedies, space, history, initial_epoch: int, verbose) -> dict:
    """Runs the search's epochs from ``initial_epoch``; returns the summary's entries
    (final metrics, and DARTS+'s early stop when it stopped the search)."""
    config, out = exp.config, {}
    # A search that stopped early (DARTS+) is finished: a rerun does not continue it.
    early_stop_path = os.path.join(exp.workdir, "early_stop.json")
    if initial_epoch < config.epochs and not os.path.exists(early_stop_path):
        train, val = search_data.streams(initial_epoch, config.epochs)
        paired, _ = pair_datasets(train, val)
        steps = search_data.steps_per_epoch
        remedy_callbacks = remedies.callbacks(history)
        tensorboard = os.path.join(exp.workdir, "tensorboard")
        artifacts = space.artifacts(
            exp.workdir, history, os.path.join(tensorboard, "mixing_weights")
        )
        out["final_metrics"] = exp.fit(
            search,
            paired,
            steps,
            initial_epoch,
            ([history, *remedy_callbacks], [artifacts]),
            optimizers={
                "learning_rate": search.weight_optimizer,
                "arch_learning_rate": search.arch_optimizer,
            },
            checkpoint_every_epochs=config.checkpoint_every_epochs,
            verbose=verbose,
        )
        stopper = next(
            (c for c in remedy_callbacks if isinstance(c, remedies_lib.EarlyStopSearch)), None
        )
        if stopper is not None and stopper.stopped_epoch is not None:
            out["early_stop"] = {"epoch": stopper.stopped_epoch + 1, "reason": stopper.reason}
            if exp.chief:
                io_utils.atomic_write_text(early_stop_path, json.dumps(out["early_stop"]) + "\n")
    elif os.path.exists(early_stop_path):
        with open(early_stop_path) as f:
            out["early_stop"] = json.load(f)
    return out

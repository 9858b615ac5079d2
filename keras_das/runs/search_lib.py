"""An architecture search from a config to a workdir (what ``python -m keras_das.search`` runs).

Workdir outputs, each written atomically:

    config.json                the resolved config
    genotype.json              the derived genotype, written when the search ends
    genotypes/epoch_NNN.json   the genotype after each epoch
    genotype.png               both cells as graphs
    alpha_history.json         every owner's mixing weights after each epoch
    alphas_normal.png, alphas_reduce.png   how each edge's mixing weights moved
    tensorboard/               losses, accuracies, learning rates, per-edge mixing weights
    checkpoints/               everything needed to resume (see keras_das.runs.checkpoint)
    search_summary.json        final metrics, wall time, the genotype

Running the same command again on the same workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import tempfile
import time

import keras

from keras_das import io_utils
from keras_das.engine import architect as architect_lib
from keras_das.engine import remedies as remedies_lib
from keras_das.engine import selection
from keras_das.engine.schedules import EpochCosineDecay
from keras_das.engine.search_model import SearchModel
from keras_das.engine.search_model import pair_datasets
from keras_das.runs import callbacks as callbacks_lib
from keras_das.runs import checkpoint as checkpoint_lib
from keras_das.runs import data
from keras_das.runs import distribution
from keras_das.runs import experiment
from keras_das.runs import gap_report
from keras_das.space import latency as latency_lib
from keras_das.space import primitives
from keras_das.space import relaxations
from keras_das.space import variables
from keras_das.space.genotype import Genotype
from keras_das.space.search_network import SearchNetwork


def validate_config(config) -> None:
    """Raises a ValueError naming the field, the bad value and the valid choices."""
    experiment.check_field("model.op_names", primitives.check_op_names, config.model.op_names)
    if len(config.model.op_names) < 2:
        raise ValueError(
            f"config.model.op_names needs at least 2 ops, got {config.model.op_names!r}"
        )
    experiment.check_field(
        "model.relaxation",
        relaxations.check_relaxation,
        config.model.relaxation,
        len(config.model.op_names),
    )
    experiment.check_field(
        "model.temperature", relaxations.check_temperature, config.model.temperature
    )
    experiment.check_field("arch.architect", architect_lib.check_architect, config.arch.architect)
    experiment.check_field(
        "distribution.strategy", distribution.check_strategy, config.distribution.strategy
    )
    experiment.check_positive(
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
    experiment.check_positive(config, "optimizer.lr", "arch.lr", integer=False)
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
    r = config.remedies
    experiment.check_field(
        "remedies.temperature.schedule",
        remedies_lib.schedule_value,
        r.temperature.schedule,
        r.temperature.start,
        r.temperature.end,
        0.0,
    )
    if r.zero_one.enabled and config.model.relaxation not in ("sigmoid", "gate"):
        raise ValueError(
            "config.remedies.zero_one acts on sigmoid weights; set config.model.relaxation="
            f"'sigmoid' (got {config.model.relaxation!r})"
        )
    if r.partial_channels.enabled:
        experiment.check_positive(config, "remedies.partial_channels.k")
        if config.model.channels % r.partial_channels.k:
            raise ValueError(
                f"config.remedies.partial_channels.k={r.partial_channels.k} must divide "
                f"config.model.channels={config.model.channels}"
            )
    if r.perturbation.enabled:
        experiment.check_positive(config, "remedies.perturbation.batches")
    if r.warmup.enabled and not 0 <= r.warmup.epochs:
        raise ValueError(f"config.remedies.warmup.epochs must be >= 0, got {r.warmup.epochs!r}")
    if r.latency.table and not os.path.exists(r.latency.table):
        raise ValueError(f"config.remedies.latency.table={r.latency.table!r} does not exist")
    if config.optimizer.grad_clip is not None and not config.optimizer.grad_clip > 0:
        raise ValueError(
            f"config.optimizer.grad_clip must be > 0 or None, got {config.optimizer.grad_clip!r}"
        )


def build_search_model(config, info: data.DatasetInfo, steps_per_epoch: int) -> SearchModel:
    """The supernet and its SearchModel, compiled as the config says (call under the strategy).

    The remedies the config switches on become architecture penalties here; their
    callbacks come from ``remedy_callbacks``.
    """
    remedies = config.remedies
    net = SearchNetwork(
        num_classes=info.num_classes,
        channels=config.model.channels,
        num_cells=config.model.num_cells,
        steps=config.model.steps,
        multiplier=config.model.multiplier,
        stem_multiplier=config.model.stem_multiplier,
        op_names=tuple(config.model.op_names),
        relaxation=config.model.relaxation,
        temperature=config.model.temperature,
        seed=config.seed,
        **derivation_options(config),
        **cell_options(config),
    )
    search = SearchModel(net)
    search.build((None, *info.image_shape))
    penalties = []
    if remedies.l1.enabled:
        penalties.append(remedies_lib.l1_penalty(remedies.l1.weight))
    if remedies.zero_one.enabled:
        penalties.append(remedies_lib.zero_one_penalty(remedies.zero_one.weight))
    if remedies.latency.enabled:
        penalties.append(
            remedies_lib.latency_penalty(remedies.latency.weight, latency_tables(config, net, info))
        )
    lr = EpochCosineDecay(
        config.optimizer.lr, config.epochs, steps_per_epoch, config.optimizer.lr_min
    )
    search.compile(
        weight_optimizer=keras.optimizers.SGD(lr, momentum=config.optimizer.momentum),
        arch_optimizer=keras.optimizers.Adam(
            arch_learning_rate(config, steps_per_epoch),
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
        arch_penalties=penalties,
        freezable_arch=remedies.warmup.enabled,
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    return search


def arch_learning_rate(config, steps_per_epoch: int) -> float:
    """``arch.lr``, scaled up for searches shorter than ``arch.lr_reference_steps`` steps.

    Adam moves each alpha by about its learning rate per step whatever the gradient's
    scale, so how far the alphas can travel in a search is about lr x its architecture
    steps. DARTS's 3e-4 was set for 50 epochs of 391 steps (19550); a search of N < 19550
    steps gets ``lr * 19550 / N`` so that they can travel as far, and a longer one keeps
    ``lr``. Without it, a search of a few hundred steps ends with the mixing weights still
    uniform and a genotype decided by noise. ``lr_reference_steps=0`` turns it off.
    """
    reference = config.arch.lr_reference_steps
    frozen = config.remedies.warmup.epochs if config.remedies.warmup.enabled else 0
    arch_steps = max(1, (config.epochs - frozen) * steps_per_epoch)
    return config.arch.lr * max(1.0, reference / arch_steps) if reference else config.arch.lr


def derivation_options(config) -> dict:
    """The derivation constraints the remedies switch on (P-DARTS skip cap, param paths)."""
    r = config.remedies
    return {
        "genotype_max_skips": r.skip_cap.max_skips if r.skip_cap.enabled else None,
        "genotype_min_param_ops": r.param_paths.min_param_ops if r.param_paths.enabled else 0,
    }


def cell_options(config) -> dict:
    """Partial channels (PC-DARTS) and the auxiliary skip (DARTS-) of the search cells."""
    r = config.remedies
    return {
        "partial_channels": r.partial_channels.k if r.partial_channels.enabled else 1,
        "edge_normalization": bool(
            r.partial_channels.enabled and r.partial_channels.edge_normalization
        ),
        "aux_skip": bool(r.aux_skip.enabled),
    }


def latency_tables(config, net, info) -> dict:
    """Per-cell-type latency tables for the expected-latency penalty (measured and cached,
    or read from ``remedies.latency.table``)."""
    given = config.remedies.latency.table
    table = latency_lib.LatencyTable(
        given or None, batch_size=config.remedies.latency.batch_size, measure_missing=not given
    )
    tables = latency_lib.search_network_tables(net, table, info.image_shape)
    if table.measured:
        logging.info("Measured %d op latencies; cached in %s", table.measured, table.path)
        table.save()
    return tables


def remedy_callbacks(config, history=None) -> tuple[list, remedies_lib.EarlyStopSearch | None]:
    """The callbacks of the remedies the config switches on (and the early stopper, which
    reads each epoch's genotype from ``history``)."""
    r = config.remedies
    callbacks = []
    if r.temperature.schedule != "constant":
        callbacks.append(
            remedies_lib.TemperatureSchedule(
                r.temperature.schedule, r.temperature.start, r.temperature.end, config.epochs
            )
        )
    if r.aux_skip.enabled:
        callbacks.append(remedies_lib.AuxiliarySkipSchedule(r.aux_skip.beta, config.epochs))
    if r.warmup.enabled:
        callbacks.append(remedies_lib.ArchWarmup(r.warmup.epochs))
    early = None
    if r.early_stop.enabled:
        early = remedies_lib.EarlyStopSearch(
            r.early_stop.max_skips, r.early_stop.stable_epochs, history=history
        )
        callbacks.append(early)
    return callbacks, early


def run(config, workdir: str, verbose: int | str = "auto") -> dict:
    """Searches as ``config`` says, writing to ``workdir``; resumes from its checkpoint.

    Returns:
        The summary also written to ``search_summary.json``.

    Raises:
        ValueError: an invalid config (before any training).
        FloatingPointError: the loss became NaN (the last good checkpoint is kept).
    """
    validate_config(config)
    strategy = distribution.make_strategy(config.distribution)  # first: it may split the CPU
    info = data.get_info(config.data)  # an unknown dataset fails here, before training
    experiment.set_seeds(config.seed, config.deterministic)
    chief = distribution.is_chief(strategy)
    os.makedirs(workdir, exist_ok=True)
    if chief:
        experiment.prepare_workdir(config, workdir)

    with strategy.scope():
        _, _, _, steps = data.search_datasets(config.data, config.data.batch_size, config.seed)
        search = build_search_model(config, info, steps)
        net = search.supernet
    # Non-chief workers of a multi-worker run checkpoint into a scratch folder.
    ckpt_dir = os.path.join(workdir, "checkpoints") if chief else tempfile.mkdtemp()
    os.makedirs(ckpt_dir, exist_ok=True)
    checkpoint = checkpoint_lib.Checkpoint(
        ckpt_dir,
        {
            "supernet": net,
            "weight_optimizer": search.weight_optimizer,
            "arch_optimizer": search.arch_optimizer,
        },
    )
    shared = checkpoint_lib.Checkpoint(os.path.join(workdir, "checkpoints"), checkpoint.groups)
    initial_epoch = shared.restore() or 0
    if initial_epoch:
        logging.info("Resuming %s after epoch %d", workdir, initial_epoch)

    history_path = os.path.join(workdir, "alpha_history.json")
    previous = (
        callbacks_lib.MixingWeightsHistory.load(history_path)
        if initial_epoch and os.path.exists(history_path)
        else None
    )
    record = callbacks_lib.MixingWeightsHistory(history_path if chief else None, initial=previous)
    nan_guard = callbacks_lib.NaNGuard(steps)
    callbacks = [
        nan_guard,
        record,
        callbacks_lib.CheckpointEveryEpoch(
            checkpoint, config.epochs, config.checkpoint_every_epochs, nan_guard
        ),
        callbacks_lib.LearningRateLogger(
            {"learning_rate": search.weight_optimizer, "arch_learning_rate": search.arch_optimizer}
        ),
    ]
    extra, early_stop = remedy_callbacks(config, record)
    callbacks[2:2] = extra  # before checkpointing, so that state they set is saved
    if chief:
        tensorboard = os.path.join(workdir, "tensorboard")
        callbacks += [
            callbacks_lib.SearchArtifacts(
                workdir, record, os.path.join(tensorboard, "mixing_weights")
            ),
            keras.callbacks.TensorBoard(tensorboard, write_graph=False),
        ]

    summary = {"epochs": config.epochs, "resumed_from_epoch": initial_epoch}
    start = time.time()
    # A search that stopped early (DARTS+) is finished: a rerun does not continue it.
    early_stop_path = os.path.join(workdir, "early_stop.json")
    if initial_epoch < config.epochs and not os.path.exists(early_stop_path):
        train, val, _, steps = data.search_datasets(
            config.data, config.data.batch_size, config.seed, initial_epoch, config.epochs
        )
        paired, _ = pair_datasets(train, val)
        history = search.fit(
            paired,
            steps_per_epoch=steps,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=verbose,
        )
        if nan_guard.failure is not None:
            raise FloatingPointError(nan_guard.message(shared.latest()))
        summary["final_metrics"] = {k: float(v[-1]) for k, v in history.history.items()}
        if early_stop is not None and early_stop.stopped_epoch is not None and chief:
            stopped = {"epoch": early_stop.stopped_epoch + 1, "reason": early_stop.reason}
            io_utils.atomic_write_text(early_stop_path, json.dumps(stopped) + "\n")
    if os.path.exists(early_stop_path):
        with open(early_stop_path) as f:
            summary["early_stop"] = json.load(f)
    summary["wall_time_s"] = time.time() - start
    genotype = record.genotype or net.genotype()  # derived after the last epoch run here
    if config.remedies.perturbation.enabled:
        summary["argmax_genotype"] = genotype.to_dict()
        selection_start = time.time()
        genotype = select_by_perturbation(config, net)
        summary["perturbation_selection_s"] = time.time() - selection_start
    if config.remedies.gap_report.enabled and chief:
        summary["gap_report"] = write_gap_report(config, search, genotype, info, workdir)
    summary["genotype"] = genotype.to_dict()
    summary["skip_connections"] = {
        c: genotype.count("skip_connect", c) for c in ("normal", "reduce")
    }
    summary["alphas"] = {a.path: a.numpy().tolist() for a in search.arch_vars}
    summary["mixing_entropy"] = {
        name: float(relaxations.entropy(w))
        for name, w in variables.mixing_weights(search.supernet).items()
    }
    summary["max_mixing_entropy"] = math.log(len(config.model.op_names))
    logging.info("%s", describe(summary))
    if chief:
        genotype.save(os.path.join(workdir, "genotype.json"))
        summary_dir = workdir
    else:  # other workers of a multi-worker run report under workers/
        summary_dir = os.path.join(workdir, "workers", distribution.task_name(strategy))
    io_utils.atomic_write_text(
        os.path.join(summary_dir, "search_summary.json"), json.dumps(summary, indent=2) + "\n"
    )
    return summary


def describe(summary: dict) -> str:
    """What a search decided, in words: each cell's mixing entropy and the ops it chose."""
    genotype = Genotype.from_dict(summary["genotype"])
    uniform = summary["max_mixing_entropy"]
    lines = [f"Search result (mixing entropy, mean over edges in nats; uniform: {uniform:.4f}):"]
    for name, value in summary["mixing_entropy"].items():
        lines.append(f"  {name}: entropy {value:.4f}")
    for cell in ("normal", "reduce"):
        counts = collections.Counter(op for op, _ in getattr(genotype, cell))
        chosen = ", ".join(f"{op} x{n}" for op, n in counts.most_common())
        lines.append(f"  {cell} cell chose: {chosen}")
    return "\n".join(lines)


def select_by_perturbation(config, net) -> Genotype:
    """DARTS-PT's selection (``keras_das.engine.selection``) on search-val batches."""
    _, val, _, _ = data.search_datasets(config.data, config.data.batch_size, config.seed + 1)
    batches = list(val.take(config.remedies.perturbation.batches))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return selection.perturbation_genotype(net, batches, loss)


def write_gap_report(config, search, genotype, info, workdir) -> dict:
    """Writes ``gap_report.json``: supernet vs derived network, and the derived net's cost."""
    train, val, _, steps = data.search_datasets(
        config.data, config.data.batch_size, config.seed + 1
    )
    result = gap_report.report(
        search,
        genotype,
        train,
        val,
        steps,
        info.image_shape,
        info.num_classes,
        recalibration_steps=min(config.remedies.gap_report.recalibration_batches, steps),
    )
    if config.remedies.latency.enabled:
        tables = latency_tables(config, search.supernet, info)
        result["expected_latency_ms"] = remedies_lib.expected_latency(search.supernet, tables)
    io_utils.atomic_write_text(
        os.path.join(workdir, "gap_report.json"), json.dumps(result, indent=2) + "\n"
    )
    return result

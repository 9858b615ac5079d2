"""What a search binary searches: the DARTS cell space, or a Keras model of the user's.

A search run (``keras_das.runs.search_lib.run``) is one flow: data, supernet, ``fit`` with
checkpoints and alpha history, decision, outputs. The two spaces differ only where the
supernet is made and where its decision is read and written, and each is one class here:

- ``CellSpace`` (``model.builder`` unset): the DARTS ``SearchNetwork`` the ``model``
  section describes; its decision is a genotype (DARTS-PT's selection, or the argmax), the gap
  report compares it with the ``DiscreteNetwork`` it derives, and the run writes
  ``genotype.json`` for ``keras_das.train`` to retrain.
- ``ModelSpace`` (``model.builder="package.module:function"``): the Keras model the user's
  function builds from the ``DatasetInfo``, with MixedOps where it searches; its decision
  is one op per MixedOp (DARTS-PT's, or the argmax), the gap report compares the supernet with its
  ``keras_das.discretize`` copy, and the run writes that copy as ``chosen.keras`` (Keras
  layers only where the ops are Keras's or keras_das's named ops) and exports it for TF
  Serving. ``keras_das.train`` retrains ``chosen.keras`` from scratch
  (``--config.model.keras_file``).

The DARTS-only remedies (those that act on cells, edges and genotypes) are refused for a
user model when the config is checked; DARTS-PT's selection (``remedies.perturbation``)
works on both (per edge, or per MixedOp).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time

import keras

from keras_das import io_utils
from keras_das.discrete.discretize import discretize
from keras_das.engine import remedies as remedies_lib
from keras_das.engine import selection
from keras_das.runs import callbacks as callbacks_lib
from keras_das.runs import gap_report
from keras_das.runs import plugins
from keras_das.space import relaxations
from keras_das.space.genotype import Genotype
from keras_das.space.mixed_op import alpha_owning_mixed_ops
from keras_das.space.search_network import SearchNetwork

# Remedies that act on DARTS cells, edges or genotypes, by their config field.
DARTS_ONLY_REMEDIES = (
    "skip_cap",
    "param_paths",
    "early_stop",
    "aux_skip",
    "partial_channels",
    "latency",
)

# The loss every search binary optimises: integer labels (a class per example, or per
# pixel) against logits on the last axis.
LOSS_FN = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def from_config(config, remedies: remedies_lib.RemedyPlan):
    """The space a search config asks for (``model.builder`` set: the user's model).

    Raises:
        ValueError: ``model.builder`` cannot be loaded, or a DARTS-only remedy is on for a
            user model.
    """
    builder = config.model.get("builder")
    if builder is None:
        return CellSpace(config, remedies)
    function = plugins.load_function(builder, "model.builder")
    enabled = [name for name in DARTS_ONLY_REMEDIES if config.remedies[name].enabled]
    if enabled:
        raise ValueError(
            f"config.remedies.{enabled[0]} acts on DARTS cells and genotypes; a user model "
            f"(config.model.builder={builder!r}) takes only "
            f"{[n for n in config.remedies if n not in DARTS_ONLY_REMEDIES]} "
            f"(switched on: {enabled})"
        )
    return ModelSpace(config, remedies, function)


class CellSpace:
    """The DARTS cell search space (see the module docstring)."""

    def __init__(self, config, remedies: remedies_lib.RemedyPlan):
        self.config, self.remedies = config, remedies

    def build(self, info) -> keras.Model:
        m = self.config.model
        return SearchNetwork(
            num_classes=info.num_classes,
            channels=m.channels,
            num_cells=m.num_cells,
            steps=m.steps,
            multiplier=m.multiplier,
            stem_multiplier=m.stem_multiplier,
            op_names=tuple(m.op_names),
            relaxation=m.relaxation,
            temperature=m.temperature,
            seed=self.config.seed,
            **self.remedies.network_options,
        )

    def latency_tables(self, supernet, image_shape):
        return self.remedies.latency_tables(supernet, image_shape)

    def artifacts(self, workdir, history, tensorboard_dir) -> keras.callbacks.Callback:
        return callbacks_lib.SearchArtifacts(workdir, history, tensorboard_dir)

    def finish(self, exp, search, search_data, history) -> dict:
        """Decides the genotype, writes ``gap_report.json`` and ``genotype.json``; returns
        the summary's entries."""
        remedies, workdir, out = self.remedies, exp.workdir, {}
        genotype = history.genotype or search.supernet.genotype()  # the last epoch's
        if remedies.perturbation_batches:
            out["argmax_genotype"] = genotype.to_dict()
            start = time.time()
            genotype = select_by_perturbation(search_data, search.supernet, remedies)
            out["perturbation_selection_s"] = time.time() - start
        if remedies.gap_report_batches is not None and exp.chief:
            out["gap_report"] = self._gap_report(search, genotype, search_data, workdir)
        out.update(genotype_decision(search, genotype, len(self.config.model.op_names)))
        logging.info("%s", describe_genotype(out))
        if exp.chief:
            genotype.save(os.path.join(workdir, "genotype.json"))
        return out

    def _gap_report(self, search, genotype, search_data, workdir) -> dict:
        train, val = search_data.streams(seed=search_data.seed + 1)
        steps, info = search_data.steps_per_epoch, search_data.info
        result = gap_report.report(
            search,
            genotype,
            train,
            val,
            steps,
            info.image_shape,
            info.num_classes,
            recalibration_steps=min(self.remedies.gap_report_batches, steps),
        )
        tables = self.remedies.latency_tables(search.supernet, info.image_shape)
        if tables is not None:
            result["expected_latency_ms"] = remedies_lib.expected_latency(search.supernet, tables)
        _write_json(os.path.join(workdir, "gap_report.json"), result)
        return result


class ModelSpace:
    """A Keras model of the user's, with MixedOps (see the module docstring)."""

    def __init__(self, config, remedies: remedies_lib.RemedyPlan, builder):
        self.config, self.remedies, self.builder = config, remedies, builder

    def build(self, info) -> keras.Model:
        reference = self.config.model.builder
        model = self.builder(info)
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"config.model.builder={reference!r} must return a keras.Model with MixedOps, "
                f"got {type(model).__name__}"
            )
        info.check_inputs(
            model, f"config.model.builder={reference!r} built {model.name!r} with inputs"
        )
        return model

    def latency_tables(self, supernet, image_shape):
        return None  # refused in from_config

    def artifacts(self, workdir, history, tensorboard_dir) -> keras.callbacks.Callback:
        return callbacks_lib.MixedOpArtifacts(workdir, history, tensorboard_dir)

    def finish(self, exp, search, search_data, history) -> dict:
        """Discretizes the supernet (each MixedOp's candidate by DARTS-PT's selection, or
        its argmax), writes ``gap_report.json``, ``chosen.json``, ``chosen.keras`` and
        ``export/1/``; returns the summary's entries. With the gap report on,
        ``chosen.keras`` keeps the batch-norm statistics recalibrated for it there (not the
        supernet's, gathered under the mixture)."""
        workdir, info, out = exp.workdir, search_data.info, {}
        choices = None  # each MixedOp's argmax
        if self.remedies.perturbation_batches:
            out["argmax_chosen"] = model_decision(search)["chosen"]
            start = time.time()
            _, val = search_data.streams(seed=search_data.seed + 1)
            choices = selection.mixed_op_choices(
                search.supernet, list(val.take(self.remedies.perturbation_batches)), LOSS_FN
            )
            out["perturbation_selection_s"] = time.time() - start
        chosen_model = discretize(search.supernet, choices)
        if self.remedies.gap_report_batches is not None and exp.chief:
            train, val = search_data.streams(seed=search_data.seed + 1)
            steps = search_data.steps_per_epoch
            out["gap_report"] = gap_report.model_report(
                search.supernet,
                chosen_model,
                train,
                val,
                steps,
                info.image_shape,
                recalibration_steps=min(self.remedies.gap_report_batches, steps),
            )
            _write_json(os.path.join(workdir, "gap_report.json"), out["gap_report"])
        out.update(model_decision(search, choices))
        logging.info("%s", describe_choices(out))
        if exp.chief:
            _write_json(os.path.join(workdir, "chosen.json"), out["chosen"])
            with io_utils.atomic_path(os.path.join(workdir, "chosen.keras")) as tmp:
                chosen_model.save(tmp)
            if self.config.export.enabled:
                out.update(exp.export(chosen_model, info, version=1))
        return out


def select_by_perturbation(search_data, net, remedies) -> Genotype:
    """DARTS-PT's selection (``keras_das.engine.selection``) on search-val batches (drawn
    with the next seed, as the gap report's)."""
    _, val = search_data.streams(seed=search_data.seed + 1)
    batches = list(val.take(remedies.perturbation_batches))
    return selection.perturbation_genotype(net, batches, LOSS_FN)


def genotype_decision(search, genotype: Genotype, num_ops: int) -> dict:
    """The summary's account of what a cell search decided: the genotype, its skips, the
    alphas and each cell's mixing entropy (against the uniform mix's)."""
    return {
        "genotype": genotype.to_dict(),
        "skip_connections": {c: genotype.count("skip_connect", c) for c in ("normal", "reduce")},
        "alphas": {a.path: a.numpy().tolist() for a in search.arch_vars},
        "mixing_entropy": {
            name: float(relaxations.entropy(w))
            for name, w in relaxations.model_mixing_weights(search.supernet).items()
        },
        "max_mixing_entropy": math.log(num_ops),
    }


def model_decision(search, choices: dict[str, int] | None = None) -> dict:
    """The summary's account of what a user model's search decided: each MixedOp's chosen
    op (``choices``, e.g. DARTS-PT's, else the argmax), mixing weights and mixing entropy
    (against the uniform mix's, ln of its candidates)."""
    mixed_ops = alpha_owning_mixed_ops(search.supernet)
    weights = {mix.name: mix.get_mixing_weights() for mix in mixed_ops}
    return {
        "chosen": {
            mix.name: mix.candidate_names[choices[mix.name]] if choices else mix.chosen_name()
            for mix in mixed_ops
        },
        "candidates": {mix.name: list(mix.candidate_names) for mix in mixed_ops},
        "mixing_weights": {name: w.tolist() for name, w in weights.items()},
        "alphas": {a.path: a.numpy().tolist() for a in search.arch_vars},
        "mixing_entropy": {name: float(relaxations.entropy(w)) for name, w in weights.items()},
        "max_mixing_entropy": {mix.name: math.log(len(mix.candidate_names)) for mix in mixed_ops},
    }


def describe_genotype(summary: dict) -> str:
    """What a cell search decided, in words: each cell's mixing entropy and the ops it chose."""
    genotype = Genotype.from_dict(summary["genotype"])
    uniform = summary["max_mixing_entropy"]
    lines = [f"Search result (mixing entropy, mean over edges in nats; uniform: {uniform:.4f}):"]
    for name, value in summary["mixing_entropy"].items():
        lines.append(f"  {name}: entropy {value:.4f}")
    argmax = summary.get("argmax_genotype")
    argmax = Genotype.from_dict(argmax) if argmax else None
    for cell in ("normal", "reduce"):
        counts = collections.Counter(op for op, _ in getattr(genotype, cell))
        chosen = ", ".join(f"{op} x{n}" for op, n in counts.most_common())
        if argmax is not None:
            kept = len(
                set(map(tuple, getattr(genotype, cell))) & set(map(tuple, getattr(argmax, cell)))
            )
            chosen += f" (DARTS-PT; {kept} of {len(getattr(genotype, cell))} edges as the argmax)"
        lines.append(f"  {cell} cell chose: {chosen}")
    return "\n".join(lines)


def describe_choices(summary: dict) -> str:
    """What a user model's search decided, in words: each MixedOp's op and mixing weights."""
    lines = ["Search result (each MixedOp's choice; mixing entropy in nats, uniform in brackets):"]
    for name, op in summary["chosen"].items():
        weights = ", ".join(
            f"{candidate}={w:.2f}"
            for candidate, w in zip(summary["candidates"][name], summary["mixing_weights"][name])
        )
        lines.append(
            f"  {name}: {op} (entropy {summary['mixing_entropy'][name]:.4f} "
            f"[{summary['max_mixing_entropy'][name]:.4f}]; {weights})"
        )
    return "\n".join(lines)


def _write_json(path: str, value) -> None:
    io_utils.atomic_write_text(path, json.dumps(value, indent=2) + "\n")

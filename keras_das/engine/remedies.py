"""Remedies for the known failure modes of differentiable search.

Each remedy is a penalty the architecture step minimises (``SearchModel.compile(
arch_penalties=...)``) or a callback, switched on from the ``remedies`` section of a
search config (see ``configs/cifar.py``), with the published defaults:

- sparsity: an L1 penalty on the mixing weights; FairDARTS's zero-one loss
  ``-mean((sigmoid(alpha) - 0.5)^2)`` (weight 10) for the sigmoid relaxation;
- temperature schedules (constant, linear, exponential) for every relaxation;
- early stopping when the normal cell reaches a skip cap or the op ranking has been stable
  for k epochs (DARTS+);
- an auxiliary skip connection scaled by a factor that decays to zero (DARTS-);
- warm-up epochs with the alphas frozen (PC-DARTS);
- an expected-latency penalty ``lambda * sum_edges sum_ops p_op * latency_op``
  (FBNet / ProxylessNAS), with tables from ``keras_das.space.latency``.

``plan(config.remedies, epochs)`` is the one place that reads a config's ``remedies``
section: it checks it and returns a ``RemedyPlan`` with everything a search run needs from
it (the search network's arguments, the penalties, the callbacks, what happens after the
search). What the remedies act on lives where it acts: the derivation constraints (P-DARTS's
skip cap, parameterised paths) with the derivation rule in ``keras_das.space.genotype``,
partial channels and the auxiliary skip in the search cells, DARTS-PT's selection in
``keras_das.engine.selection``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import keras
import numpy as np
from keras import ops

from keras_das.space import latency as latency_lib
from keras_das.space import relaxations
from keras_das.space import variables

SCHEDULES = ("constant", "linear", "exponential")


# -- penalties: callables f(supernet) -> scalar, evaluated in the architecture step -------


def _all_weights(supernet):
    return list(relaxations.model_mixing_weights(supernet, training=False).values())


def l1_penalty(weight: float):
    """``weight * mean |w|`` over every mixing weight (sparsity pressure).

    Under softmax each edge's weights sum to 1, so the L1 norm is constant there: the
    penalty acts on sigmoid (and gate) relaxations, where it pushes weak ops to zero.
    """

    def penalty(supernet):
        weights = _all_weights(supernet)
        return weight * ops.mean(ops.concatenate([ops.reshape(ops.abs(w), (-1,)) for w in weights]))

    penalty.__name__ = "l1_penalty"
    return penalty


def zero_one_penalty(weight: float = 10.0):
    """FairDARTS's zero-one loss, ``-weight * mean((w - 0.5)^2)``: pushes each sigmoid
    weight toward 0 or 1, so that the discretisation gap shrinks."""

    def penalty(supernet):
        weights = _all_weights(supernet)
        flat = ops.concatenate([ops.reshape(w, (-1,)) for w in weights])
        return -weight * ops.mean(ops.square(flat - 0.5))

    penalty.__name__ = "zero_one_penalty"
    return penalty


def latency_penalty(weight: float, tables: dict):
    """``weight * sum_edges sum_ops p_op * latency_op``: the expected latency (FBNet).

    Args:
        weight: lambda, per millisecond.
        tables: ``{owner_key: [num_edges, num_ops] milliseconds}`` with keys as
            ``keras_das.space.relaxations.model_mixing_weights`` names them (``"search_network/normal"``);
            for a DARTS network, each cell type's table sums its cells' edges
            (``keras_das.space.latency.search_network_tables``).
    """
    constants = {k: np.asarray(v, dtype=np.float32) for k, v in tables.items()}

    def penalty(supernet):
        weights = relaxations.model_mixing_weights(supernet, training=False)
        missing = sorted(set(constants) - set(weights))
        if missing:
            raise ValueError(f"latency tables for {missing}, but the model has {sorted(weights)}")
        total = 0.0
        for key, table in constants.items():
            w = weights[key]
            total = total + ops.sum(w * ops.cast(table, w.dtype))
        return weight * total

    penalty.__name__ = "latency_penalty"
    return penalty


def expected_latency(supernet, tables: dict) -> float:
    """The current expected latency (ms) under ``tables``, for reports."""
    return float(latency_penalty(1.0, tables)(supernet))


# -- schedules ----------------------------------------------------------------------------


def schedule_value(kind: str, start: float, end: float, progress: float) -> float:
    """A value between ``start`` (progress 0) and ``end`` (progress 1).

    ``constant`` stays at ``start``; ``linear`` interpolates; ``exponential`` interpolates
    the logarithm (GDAS anneals its temperature 10 -> 0.1 this way).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; expected one of {list(SCHEDULES)}")
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return start
    if kind == "linear":
        return start + (end - start) * progress
    if start <= 0 or end <= 0:
        raise ValueError(f"an exponential schedule needs positive ends, got {start!r} -> {end!r}")
    return math.exp(math.log(start) + (math.log(end) - math.log(start)) * progress)


class TemperatureSchedule(keras.callbacks.Callback):
    """Sets every relaxation temperature of the supernet at the start of each epoch.

    Epoch ``e`` of ``epochs`` gets ``schedule_value(kind, start, end, e / (epochs - 1))``.
    Temperatures are variables, so the compiled step is not retraced.
    """

    def __init__(self, kind: str, start: float, end: float, epochs: int):
        super().__init__()
        schedule_value(kind, start, end, 0.0)  # validates
        self.kind, self.start, self.end, self.epochs = kind, start, end, epochs

    def value(self, epoch: int) -> float:
        return schedule_value(self.kind, self.start, self.end, epoch / max(1, self.epochs - 1))

    def on_epoch_begin(self, epoch, logs=None):
        supernet = getattr(self.model, "supernet", self.model)
        for owner in variables.arch_owners(supernet):
            owner.temperature.assign(self.value(epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["temperature"] = self.value(epoch)


class AuxiliarySkipSchedule(keras.callbacks.Callback):
    """DARTS-: the auxiliary skip connection's factor, decaying linearly from ``start`` to 0
    over the epochs (the supernet's ``aux_skip_beta`` variable)."""

    def __init__(self, start: float, epochs: int):
        super().__init__()
        self.start, self.epochs = start, epochs

    def on_epoch_begin(self, epoch, logs=None):
        supernet = getattr(self.model, "supernet", self.model)
        supernet.aux_skip_beta.assign(
            schedule_value("linear", self.start, 0.0, epoch / max(1, self.epochs - 1))
        )


class ArchWarmup(keras.callbacks.Callback):
    """PC-DARTS: the first ``epochs`` epochs train the weights only (alphas frozen)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.model.arch_enabled.assign(epoch >= self.epochs)


class EarlyStopSearch(keras.callbacks.Callback):
    """DARTS+: stops the search when the derived normal cell has ``max_skips`` skip
    connections, or when the ranking of the ops on every edge has not changed for
    ``stable_epochs`` epochs (either criterion off when 0).

    ``stopped_epoch`` and ``reason`` say what happened. With ``history`` (the run's
    ``MixingWeightsHistory``, earlier in the callback list) it reads that epoch's genotype
    instead of deriving it again.
    """

    def __init__(
        self,
        max_skips: int = 2,
        stable_epochs: int = 0,
        skip: str = "skip_connect",
        history=None,
    ):
        super().__init__()
        self.max_skips, self.stable_epochs, self.skip = max_skips, stable_epochs, skip
        self.history = history
        self.stopped_epoch = None
        self.reason = None
        self._ranking = None
        self._stable = 0

    def on_epoch_end(self, epoch, logs=None):
        supernet = getattr(self.model, "supernet", self.model)
        if self.max_skips:
            genotype = self.history.genotype if self.history else supernet.genotype()
            skips = genotype.count(self.skip, "normal")
            if skips >= self.max_skips:
                self._stop(
                    epoch, f"the normal cell has {skips} skip connections (cap {self.max_skips})"
                )
                return
        if self.stable_epochs:
            weights = relaxations.model_mixing_weights(supernet)
            ranking = tuple(
                tuple(np.argsort(-keras.ops.convert_to_numpy(w), axis=-1).ravel())
                for w in weights.values()
            )
            self._stable = self._stable + 1 if ranking == self._ranking else 0
            self._ranking = ranking
            if self._stable >= self.stable_epochs:
                self._stop(epoch, f"the op ranking has been stable for {self._stable} epochs")

    def _stop(self, epoch, reason):
        self.stopped_epoch, self.reason = epoch, reason
        self.model.stop_training = True


# -- the plan: a config's remedies section, read once ------------------------------------


@dataclasses.dataclass
class RemedyPlan:
    """What the remedies a config switches on ask of a search run (``plan`` makes it)."""

    section: object  # the config's ``remedies`` section (read-only here)
    epochs: int
    _latency_tables: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def network_options(self) -> dict:
        """``SearchNetwork`` arguments: the cells' partial channels (PC-DARTS) and auxiliary
        skip (DARTS-), and the derivation's skip cap (P-DARTS) and parameterised paths."""
        r = self.section
        return {
            "partial_channels": r.partial_channels.k if r.partial_channels.enabled else 1,
            "edge_normalization": bool(
                r.partial_channels.enabled and r.partial_channels.edge_normalization
            ),
            "aux_skip": bool(r.aux_skip.enabled),
            "genotype_max_skips": r.skip_cap.max_skips if r.skip_cap.enabled else None,
            "genotype_min_param_ops": r.param_paths.min_param_ops if r.param_paths.enabled else 0,
        }

    @property
    def frozen_epochs(self) -> int:
        """Epochs with the alphas frozen (PC-DARTS's warm-up), 0 without it."""
        return self.section.warmup.epochs if self.section.warmup.enabled else 0

    @property
    def freezable_arch(self) -> bool:
        return bool(self.section.warmup.enabled)

    @property
    def perturbation_batches(self) -> int:
        """Batches DARTS-PT's selection scores on; 0 when the argmax decides."""
        r = self.section.perturbation
        return r.batches if r.enabled else 0

    @property
    def gap_report_batches(self) -> int | None:
        """Batch-norm recalibration batches of the gap report; None: no report."""
        r = self.section.gap_report
        return r.recalibration_batches if r.enabled else None

    def latency_tables(self, supernet, image_shape) -> dict | None:
        """Per-cell-type latency tables (measured and cached, or read from
        ``latency.table``), made once per supernet; None when the latency remedy is off."""
        r = self.section.latency
        if not r.enabled:
            return None
        if id(supernet) in self._latency_tables:
            return self._latency_tables[id(supernet)]
        table = latency_lib.LatencyTable(
            r.table or None, batch_size=r.batch_size, measure_missing=not r.table
        )
        tables = latency_lib.search_network_tables(supernet, table, image_shape)
        if table.measured:
            logging.info("Measured %d op latencies; cached in %s", table.measured, table.path)
            table.save()
        self._latency_tables[id(supernet)] = tables
        return tables

    def penalties(self, latency_tables: dict | None = None) -> list:
        """The architecture step's penalties (L1, zero-one, expected latency)."""
        r = self.section
        penalties = []
        if r.l1.enabled:
            penalties.append(l1_penalty(r.l1.weight))
        if r.zero_one.enabled:
            penalties.append(zero_one_penalty(r.zero_one.weight))
        if latency_tables is not None:
            penalties.append(latency_penalty(r.latency.weight, latency_tables))
        return penalties

    def callbacks(self, history=None) -> list:
        """The remedies' callbacks, to run before the epoch's checkpoint (so that the state
        they set is saved). The early stopper reads each epoch's genotype from
        ``history`` (the run's ``MixingWeightsHistory``)."""
        r, epochs = self.section, self.epochs
        callbacks = []
        if r.temperature.schedule != "constant":
            t = r.temperature
            callbacks.append(TemperatureSchedule(t.schedule, t.start, t.end, epochs))
        if r.aux_skip.enabled:
            callbacks.append(AuxiliarySkipSchedule(r.aux_skip.beta, epochs))
        if r.warmup.enabled:
            callbacks.append(ArchWarmup(r.warmup.epochs))
        if r.early_stop.enabled:
            e = r.early_stop
            callbacks.append(EarlyStopSearch(e.max_skips, e.stable_epochs, history=history))
        return callbacks


def plan(section, epochs: int, relaxation: str = "softmax") -> RemedyPlan:
    """Checks a config's ``remedies`` section and returns its ``RemedyPlan``.

    Args:
        section: the ``remedies`` section (``configs/cifar.py`` documents each field).
        epochs: the search's epochs (schedules run over them).
        relaxation: the search's relaxation (the zero-one loss needs sigmoid weights).

    Raises:
        ValueError: naming the field (``config.remedies....``), the value and what is valid.
    """
    r = section
    t = r.temperature
    _check_field("temperature.schedule", schedule_value, t.schedule, t.start, t.end, 0.0)
    if r.zero_one.enabled and relaxation not in ("sigmoid", "gate"):
        raise ValueError(
            "config.remedies.zero_one acts on sigmoid weights; set config.model.relaxation="
            f"'sigmoid' (got {relaxation!r})"
        )
    for field, value in (
        ("partial_channels.k", r.partial_channels.k if r.partial_channels.enabled else 1),
        ("perturbation.batches", r.perturbation.batches if r.perturbation.enabled else 1),
    ):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"config.remedies.{field} must be a positive int, got {value!r}")
    if r.warmup.enabled and not 0 <= r.warmup.epochs:
        raise ValueError(f"config.remedies.warmup.epochs must be >= 0, got {r.warmup.epochs!r}")
    if r.latency.table and not os.path.exists(r.latency.table):
        raise ValueError(f"config.remedies.latency.table={r.latency.table!r} does not exist")
    return RemedyPlan(section, epochs)


def _check_field(field: str, check, *args) -> None:
    try:
        check(*args)
    except ValueError as e:
        raise ValueError(f"config.remedies.{field}: {e}") from e

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

The derivation constraints (P-DARTS's skip cap, parameterised paths) live with the
derivation rule in ``keras_das.space.genotype``; partial channels in the search cells.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_das.space import variables

SCHEDULES = ("constant", "linear", "exponential")


# -- penalties: callables f(supernet) -> scalar, evaluated in the architecture step -------


def _all_weights(supernet):
    return list(variables.mixing_weights(supernet, training=False).values())


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
            ``keras_das.space.variables.mixing_weights`` names them (``"search_network/normal"``);
            for a DARTS network, each cell type's table sums its cells' edges
            (``keras_das.space.latency.search_network_tables``).
    """
    constants = {k: np.asarray(v, dtype=np.float32) for k, v in tables.items()}

    def penalty(supernet):
        weights = variables.mixing_weights(supernet, training=False)
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
            weights = variables.mixing_weights(supernet)
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

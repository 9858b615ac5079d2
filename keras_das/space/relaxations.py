"""Continuous relaxations: how architecture parameters become mixing weights.

Every function works on the last axis, so one call serves a single MixedOp (``alpha`` of
shape ``[n]``) and a whole DARTS cell type (``alpha`` of shape ``[edges, n]``).

- ``softmax``: ``softmax(alpha / T)``, DARTS.
- ``sigmoid``: independent ``sigmoid(alpha / T)``; ops do not compete, FairDARTS.
- ``gumbel``: ``softmax((alpha + g) / T)`` with Gumbel noise ``g`` while training, SNAS/GDAS;
  without noise at inference.
- ``gumbel_hard``: the one-hot sample of ``gumbel`` with the soft sample's gradient
  (straight-through), GDAS; the one-hot argmax at inference.
- ``gate``: two candidates and one parameter, ``[sigmoid(a / T), 1 - sigmoid(a / T)]``: the
  gate ``sigmoid(a) * op_0(x) + (1 - sigmoid(a)) * op_1(x)``.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_das.space import variables

RELAXATIONS = ("softmax", "sigmoid", "gumbel", "gumbel_hard", "gate")

_GUMBEL_EPS = 1e-10


def check_relaxation(relaxation: str, num_candidates: int | None = None) -> str:
    """Raises a ValueError naming the valid relaxations, or the gate's candidate count."""
    if relaxation not in RELAXATIONS:
        raise ValueError(f"Unknown relaxation {relaxation!r}; expected one of {list(RELAXATIONS)}")
    if relaxation == "gate" and num_candidates is not None and num_candidates != 2:
        raise ValueError(f"relaxation 'gate' mixes exactly 2 candidates, got {num_candidates}")
    return relaxation


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return float(temperature)


def alpha_size(relaxation: str, num_candidates: int) -> int:
    """How many architecture parameters one mix over ``num_candidates`` needs."""
    return 1 if relaxation == "gate" else num_candidates


def mixing_weights(alpha, relaxation, temperature=1.0, training=False, seed=None):
    """The mixing weights over candidates (last axis) for ``alpha``.

    Args:
        alpha: architecture parameters, ``[..., n]`` (``[..., 1]`` for ``gate``).
        relaxation: one of ``RELAXATIONS``.
        temperature: a positive float or scalar tensor (a variable, so schedules do not
            retrace compiled steps).
        training: sample Gumbel noise (``gumbel``, ``gumbel_hard``) when true.
        seed: a ``keras.random.SeedGenerator`` for the Gumbel noise.

    Returns:
        A tensor ``[..., n]`` (``[..., 2]`` for ``gate``).
    """
    logits = alpha / ops.cast(temperature, alpha.dtype)
    if relaxation == "softmax":
        return ops.softmax(logits, axis=-1)
    if relaxation == "sigmoid":
        return ops.sigmoid(logits)
    if relaxation == "gate":
        gate = ops.sigmoid(logits)
        return ops.concatenate([gate, 1.0 - gate], axis=-1)
    if relaxation in ("gumbel", "gumbel_hard"):
        if training:
            logits = logits + gumbel_noise(ops.shape(alpha), alpha.dtype, seed) / ops.cast(
                temperature, alpha.dtype
            )
        soft = ops.softmax(logits, axis=-1)
        if relaxation == "gumbel":
            return soft
        hard = ops.one_hot(ops.argmax(logits, axis=-1), ops.shape(logits)[-1], dtype=soft.dtype)
        return hard - ops.stop_gradient(soft) + soft
    check_relaxation(relaxation)


def gumbel_noise(shape, dtype, seed=None):
    """Samples ``-log(-log(U))``, ``U ~ Uniform(0, 1)``."""
    u = keras.random.uniform(shape, minval=_GUMBEL_EPS, maxval=1.0, dtype=dtype, seed=seed)
    return -ops.log(-ops.log(u))


def entropy(weights):
    """Mean entropy (nats) of mixing weights over the last axis, normalised to sum to 1.

    Near ``log(n)`` at the start of a search; falls as the search commits to ops.
    """
    p = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), _GUMBEL_EPS)
    return -ops.mean(ops.sum(p * ops.log(ops.maximum(p, _GUMBEL_EPS)), axis=-1))


def model_mixing_weights(model: keras.layers.Layer, training: bool = False) -> dict:
    """The mixing weights of every layer of ``model`` that owns alphas
    (``variables.arch_owners``), keyed ``owner`` or ``owner/part`` (``net/normal``)."""
    out = {}
    for owner in variables.arch_owners(model):
        for name, weights in owner.named_mixing_weights(training).items():
            out[name if name == owner.name else f"{owner.name}/{name}"] = weights
    return out

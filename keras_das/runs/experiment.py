"""What every binary run shares: config checks, seeds, the workdir and its resolved config."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import keras
import ml_collections
import tensorflow as tf

from keras_das import io_utils


def config_section(fields: dict[str, Any], **overrides: Any) -> ml_collections.ConfigDict:
    """A config section with its defaults, e.g. ``data.default_config(batch_size=96)``.

    Args:
        fields: every field of the section with its default value.
        **overrides: fields to change; a misspelt one is an error with a suggestion (the
            section is locked while they are set), not a new field.

    Returns:
        The section, unlocked (a config file may add to it; the binaries lock it).
    """
    config = ml_collections.ConfigDict(fields)
    config.lock()
    for field, value in overrides.items():
        setattr(config, field, value)
    config.unlock()
    return config


def check_field(field: str, check: Callable, *args):
    """Runs ``check(*args)``; a ValueError names the config field it is about."""
    try:
        return check(*args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.{field}: {e}") from e


def check_positive(config, *fields: str, integer: bool = True) -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        ok = (
            (isinstance(value, int) and not isinstance(value, bool))
            if integer
            else isinstance(value, (int, float))
        )
        if not ok or not value > 0:
            kind = "a positive int" if integer else "a positive number"
            raise ValueError(f"config.{field} must be {kind}, got {value!r}")


def set_seeds(seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and TensorFlow; with ``deterministic``, also makes the run
    bit-for-bit repeatable (``enable_determinism``)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        enable_determinism()


def enable_determinism() -> None:
    """Deterministic ops and deterministic sums of gradients, for the rest of the process.

    ``tf.config.experimental.enable_op_determinism`` alone does not make training
    repeatable on a CPU. TensorFlow's ``AddN`` kernel (a sum of several tensors) adds
    into the first input whose buffer no other op still holds, and moves that input to
    the front of the sum. Which input that is depends on which concurrent ops have
    finished (inter-op threads), so a sum of three or more tensors is rounded differently
    from call to call. ``GradientTape`` sums the gradients of every tensor that several
    ops read (each state of a cell, each batch norm's input) with one ``AddN``, and
    Grappler's arithmetic optimizer merges chains of additions into ``AddN`` ops. On the
    smoke preset the architecture gradient of one fixed batch came out with up to 12
    different roundings in 30 calls (with oneDNN on or off, fused or per-edge cells; never
    with one inter-op thread), and two 3-epoch searches ended with alphas 4.5e-3 apart.

    So the tape sums gradients two at a time, in the order it collects them (``a + b``
    rounds as ``b + a``, whichever buffer is reused), and the arithmetic optimizer is off
    so that it does not merge those additions back into one ``AddN``.

    Raises:
        RuntimeError: this TensorFlow has no hook for the tape's sums (determinism
            cannot be promised).
    """
    tf.config.experimental.enable_op_determinism()
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    _sum_tape_gradients_pairwise()


def _sum_tape_gradients_pairwise() -> None:
    # The tape takes its aggregation function from the "vector space" registered with the
    # eager runtime; TensorFlow has no public option for it, so this re-registers
    # TensorFlow's own vector space with another aggregation function.
    try:
        from tensorflow.python import pywrap_tfe
        from tensorflow.python.eager import backprop

        vspace = backprop._default_vspace
        aggregate_default = backprop._aggregate_grads
        register = pywrap_tfe.TFE_Py_RegisterVSpace
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            "config.deterministic: this TensorFlow version gives no way to make GradientTape "
            "sum gradients in a fixed order (its AddN kernel sums in an order that depends "
            "on thread timing), so the run cannot be made deterministic"
        ) from e

    def aggregate(gradients):
        if len(gradients) > 2 and all(isinstance(g, tf.Tensor) for g in gradients):
            total = gradients[0]
            for gradient in gradients[1:]:
                total = tf.math.add(total, gradient)
            return total
        # One or two tensors (AddN of two is commutative, hence deterministic), or
        # IndexedSlices (concatenated, not summed): TensorFlow's own aggregation.
        return aggregate_default(gradients)

    register(vspace._replace(aggregate_fn=aggregate))


def prepare_workdir(config, workdir: str) -> None:
    """The chief's start on ``workdir``: removes the temporary files that writes of a
    killed earlier run left (never half files), then writes the resolved config."""
    io_utils.remove_stale_temporaries(workdir, skip=("workers",))
    write_config(config, workdir)


def write_config(config, workdir: str) -> None:
    """Writes the resolved config to ``workdir/config.json``; logs what changed on a rerun."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            previous = f.read()
        if previous.strip() != text.strip():
            old, new = json.loads(previous), json.loads(text)
            changed = sorted(_diff(old, new))
            logging.warning("Resuming in %s with a changed config: %s", workdir, ", ".join(changed))
    io_utils.atomic_write_text(path, text + "\n")


def _diff(old, new, prefix=""):
    keys = set(old) | set(new) if isinstance(old, dict) and isinstance(new, dict) else None
    if keys is None:
        if old != new:
            yield prefix.rstrip(".")
        return
    for key in keys:
        if key not in old or key not in new:
            yield prefix + key
        else:
            yield from _diff(old[key], new[key], prefix + key + ".")

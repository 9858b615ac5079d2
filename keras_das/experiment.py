"""What every binary run shares: config checks, seeds, the workdir and its resolved config."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import keras
import tensorflow as tf

from keras_das import io_utils


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
    """Seeds Python, NumPy and TensorFlow; with ``deterministic``, also deterministic ops."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


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

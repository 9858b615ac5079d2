"""Config sections and the checks of their fields: errors name the field (``config.x.y``),
the bad value and what is valid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections


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

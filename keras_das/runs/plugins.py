"""User code a config names: ``"package.module:function"`` or ``"path/to/file.py:function"``.

A search or retraining can take its model (``model.builder``) and its data (``data.name``)
from the user's own code. The config holds a string; ``load_function`` turns it into the
function, and a bad string fails when the config is checked, naming the field.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable


def is_reference(value) -> bool:
    """Whether a config value names user code (``module:function``) rather than a name."""
    return isinstance(value, str) and ":" in value


def load_function(reference: str, field: str) -> Callable:
    """The function ``reference`` names.

    Args:
        reference: ``"package.module:function"`` (imported as Python imports it) or
            ``"path/to/file.py:function"`` (a script outside any package, loaded from the
            file; a relative path is taken from the working directory).
        field: the config field that holds it, for the error messages.

    Raises:
        ValueError: the reference is malformed, its module cannot be imported, or it names
            something that is missing or not callable.
    """
    if not is_reference(reference):
        raise ValueError(
            f"config.{field}={reference!r} must name a function as 'package.module:function' "
            "or 'path/to/file.py:function'"
        )
    module_name, _, attribute = reference.rpartition(":")
    if not module_name or not attribute.isidentifier():
        raise ValueError(
            f"config.{field}={reference!r} must name a function as 'package.module:function' "
            "or 'path/to/file.py:function'"
        )
    try:
        module = _import(module_name)
    except Exception as e:  # an error in the user's module, reported with the field
        raise ValueError(
            f"config.{field}={reference!r}: cannot import {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    function = getattr(module, attribute, None)
    if not callable(function):
        found = sorted(
            name
            for name, value in vars(module).items()
            if callable(value)
            and not name.startswith("_")
            and not isinstance(value, type)
            and getattr(value, "__module__", None) == module.__name__
        )
        what = "has no" if function is None else "has a non-callable"
        raise ValueError(
            f"config.{field}={reference!r}: module {module_name!r} {what} {attribute!r}; "
            f"its functions: {found}"
        )
    return function


def _import(module_name: str):
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = os.path.abspath(module_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path!r}")
    # One module per file, so that a builder and a data source in the same script share
    # their module (and the Keras classes it registers are registered once).
    name = "keras_das_user_" + os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

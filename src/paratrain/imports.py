"""Resolve user code named as 'package.module:function' in the config."""
from __future__ import annotations

import importlib
from typing import Callable

from paratrain.config import ConfigError


def import_callable(path: str, key: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key} = '{path}': cannot import module '{module_name}' ({e})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{key} = '{path}': module '{module_name}' has no attribute '{attr}'")
    if not callable(obj):
        raise ConfigError(f"{key} = '{path}': '{attr}' is not callable")
    return obj


def import_path_of(fn: Callable) -> str:
    """The inverse, for the Python API: a top-level function -> 'module:qualname'."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise ConfigError(
            f"{getattr(fn, '__name__', fn)!r}: workers import user code by name; define it at the top level "
            "of an importable module (not __main__, not a lambda or a nested function)")
    return f"{module}:{name}"

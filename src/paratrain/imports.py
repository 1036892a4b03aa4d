"""Resolve user code named as 'package.module:function' in the config, and say where it fails.

User code imports as Python users expect: the directory `paratrain` is started from and the
config file's directory are importable (as `python -m` puts the current directory first), in the
launcher and in every worker (`PARATRAIN_USER_PATH` carries them to the workers). An error
inside user code (syntax, import, an exception, a typo in `model.options`) becomes one line that
names the config key, the file and line, and the exception.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from paratrain.config import ConfigError

USER_PATH_ENV = "PARATRAIN_USER_PATH"
_OURS = str(Path(__file__).parent)


def add_user_paths(config: str | None) -> None:
    """Put the current directory, the config file's and those the launcher passed on first on sys.path."""
    paths = [os.getcwd()] + ([str(Path(config).resolve().parent)] if config else [])
    worker = "RANK" in os.environ  # started by torchrun: its config may be the run directory's config.json
    if worker:
        paths += [p for p in os.environ.get(USER_PATH_ENV, "").split(os.pathsep) if p]
    for p in reversed(dict.fromkeys(paths)):
        if p not in sys.path:
            sys.path.insert(0, p)
    if not worker:  # set afresh, not appended to: main() called again in one process must not pile up paths
        os.environ[USER_PATH_ENV] = os.pathsep.join(dict.fromkeys(paths))  # inherited by the workers


def where(e: BaseException) -> str:
    """'file:line' of the innermost frame in user code (not paratrain's, torch's or importlib's)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith((_OURS, "<frozen")) and "site-packages" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    at = where(e)
    return f"{type(e).__name__}{': ' + text[:200] if text else ''}{' at ' + at if at != '?' else ''}"


def import_callable(path: str, key: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself, not one it imports
            raise ConfigError(f"{key} = '{path}': cannot import module '{module_name}' ({e}; looked in the current "
                              "directory, the config's and sys.path)") from None
        raise ConfigError(f"{key} = '{path}': importing '{module_name}' failed: {describe(e)}") from None
    except Exception as e:  # noqa: BLE001 - user code: any error becomes one line
        raise ConfigError(f"{key} = '{path}': importing '{module_name}' failed: {describe(e)}") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{key} = '{path}': module '{module_name}' has no attribute '{attr}'")
    if not callable(obj):
        raise ConfigError(f"{key} = '{path}': '{attr}' is not callable")
    return obj


def call_user(fn: Callable, key: str, path: str, *args, **kwargs):
    """`fn(*args, **kwargs)`; an exception inside it becomes one line naming `key`, file and line."""
    if kwargs:
        try:
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as e:
            params = ", ".join(inspect.signature(fn).parameters)
            raise ConfigError(f"{key} = '{path}': {e} (model.options is passed as keyword arguments; "
                              f"it takes: {params or 'none'})") from None
        except ValueError:  # no signature to read (a builtin): let the call say it
            pass
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: any error becomes one line
        raise ConfigError(f"{key} = '{path}' raised {describe(e)}") from None


def import_path_of(fn: Callable) -> str:
    """The inverse, for the Python API: a top-level function -> 'module:qualname'."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise ConfigError(
            f"{getattr(fn, '__name__', fn)!r}: workers import user code by name; define it at the top level "
            "of an importable module (not __main__, not a lambda or a nested function)")
    return f"{module}:{name}"

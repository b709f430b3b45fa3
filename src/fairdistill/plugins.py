"""Importing the user's Python code that a config names: ``plugins`` and ``module:attribute``.

A config's *values* never execute code (YAML is read safely, weights with
``weights_only=True``). Two keys name code on purpose, and importing it is running code the
user asked for:

* ``plugins: [module, ...]`` (top level): modules imported before the config is validated, in
  every process that reads the config: ``train``, ``config``, ``eval``, ``tsne``, ``report``,
  each sweep child and each torchrun rank (they all read it through ``config.load_config`` or
  ``RunDir.read_config``). A plugin registers models (``fairdistill.models.MODELS.register``),
  data sets (``fairdistill.data.DATASETS``) or terms (``fairdistill.methods.TERMS``) when
  imported.
* ``model.name: package.module:factory`` (``models/external.py``).

Modules are found on ``sys.path`` and, as ``python -m`` does, in the current working
directory, which is appended after the installed packages (a local file never shadows an
installed module). A module that cannot be imported is a ConfigError naming the key, the module
and the failure (with the plugin's file and line when the failure is inside it).
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
from typing import Any

from .errors import ConfigError
from .registry import suggest

MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _add_working_directory() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def import_module(name: str, key: str):
    """Import module ``name`` (dotted) or raise a ConfigError naming ``key``."""
    if not isinstance(name, str) or not MODULE_NAME.match(name):
        raise ConfigError(f"{key}: {name!r} is not a module name; expected a dotted Python module name such as "
                          "my_models or my_package.models")
    _add_working_directory()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"{key}: no module named {e.name!r} (searched the Python path and the current "
                              f"directory {os.getcwd()}); install it or run from the folder that holds it") from None
        raise ConfigError(f"{key}: importing {name!r} failed: {e}{_where(e)}") from None
    except Exception as e:  # the plugin's own code failed: say where
        raise ConfigError(f"{key}: importing {name!r} raised {type(e).__name__}: {e}{_where(e)}") from None


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename and not f.filename.startswith("<frozen")]
    return f" (at {own[-1].filename}:{own[-1].lineno})" if own else ""


def import_plugins(names, key: str = "plugins") -> list:
    """Import every module of ``names`` (a list of module names), in order."""
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of module names, got {names!r}")
    return [import_module(n, f"{key}[{i}]") for i, n in enumerate(names)]


def with_plugins(cfg):
    """``cfg`` after importing its ``plugins`` (for the places that read a config)."""
    import_plugins(getattr(cfg, "plugins", None) or [])
    return cfg


def import_object(spec: str, key: str) -> Any:
    """The object named ``package.module:attribute`` (the attribute may be dotted)."""
    module_name, sep, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attribute or not MODULE_NAME.match(attribute):
        raise ConfigError(f"{key}: {spec!r} is not an import path; expected package.module:factory, "
                          "e.g. my_models:make_net")
    obj = import_module(module_name, key)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"{key}: {getattr(obj, '__name__', module_name)!r} has no attribute {part!r}."
                              f"{suggest(part, names)}")
        obj = getattr(obj, part)
    return obj

"""Loading config files: configs/*.py build on configs/default.py wherever the repo lives."""

from __future__ import annotations

import importlib.util
import os
import types


def load_config_module(path: str) -> types.ModuleType:
    """Imports a config file by path (it must define get_config())."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    name = "fvdm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} defines no get_config()")
    return module


def load_sibling(this_file: str, name: str) -> types.ModuleType:
    """The config module `name` next to `this_file` (e.g. default.py beside ffs_xl.py)."""
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py"))


def load_config(path: str):
    """get_config() of a config file, with an optional ':arg' suffix passed to it."""
    path, _, arg = path.partition(":")
    module = load_config_module(path)
    return module.get_config(arg) if arg else module.get_config()

"""Lazy public faces: a package names what it exports, and each name is imported on first use.

``import tbac_core`` (or ``tbac_core.ladder``) stays cheap this way: torch, transformers and
diffusers load when a name that needs them is first touched, so the command line's ``--help`` and
argument checks start in well under a second.
"""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]):
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a module to the names it exports."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in module_of:
            value = getattr(importlib.import_module(module_of[name], package), name)
            globals_ = importlib.import_module(package).__dict__
            globals_[name] = value  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(module_of)

    return __getattr__, __dir__

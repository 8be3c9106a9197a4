"""Packages that double as verbs.

The design's API (README, docs/adding-a-technique.md) calls `sk.evaluate(model, task)`, `sk.export(model, path)`, `sk.prune(...)`,
`sk.quantize(...)`, `sk.distill(...)`, while the same names are the packages that implement them
(`slimkit.evaluate.count_macs`, ...). Python binds an imported subpackage as an attribute of its
parent, so the package itself must be callable: its module class gets a `__call__` that forwards
to the verb function. Both `sk.prune(model, cfg)` and `sk.prune.PruneConfig` then work.
"""
from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    """Make module `module_name` callable as its function `function_name`."""
    module = sys.modules[module_name]

    class VerbModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

        def __repr__(self) -> str:
            return f"<slimkit verb {module_name} -> {function_name}()>"

    VerbModule.__doc__ = module.__doc__
    module.__class__ = VerbModule

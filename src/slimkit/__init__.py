"""slimkit: make trained PyTorch models really smaller and faster, and measure what it cost.

    import slimkit as sk
    task = sk.data.digits()
    model = sk.train(sk.zoo.lenet5(), task, epochs=10)
    print(sk.evaluate(model, task))

Technique verbs (`sk.prune`, `sk.quantize`, ...) and their configs are exported by the technique
packages and resolved lazily, so `import slimkit` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "train": "slimkit.core.trainer",
    "TrainConfig": "slimkit.core.trainer",
    "Task": "slimkit.core.task",
    "Config": "slimkit.core.config",
    "Selector": "slimkit.core.selector",
    "save": "slimkit.core.artifact",
    "load": "slimkit.core.artifact",
    "register_builder": "slimkit.core.artifact",
    "Metrics": "slimkit.evaluate",
    "apply": "slimkit.core.registry",
    "techniques": "slimkit.core.registry",
}
_SUBMODULES = {"data", "zoo", "errors", "evaluate", "export", "report", "core"}
# Technique packages export their verbs and configs (`sk.prune`, `sk.PruneConfig`) through
# their own `__all__`; any subpackage is searched on first access, so none is listed here.


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        # `evaluate` and `export` are packages that are also callable verbs (core/verbs.py)
        return importlib.import_module(f"slimkit.{name}")
    import pkgutil

    if any(info.ispkg and info.name == name for info in pkgutil.iter_modules(__path__)):
        # `sk.distill`, `sk.prune`: always the package (callable as its verb, core/verbs.py), never the
        # same-named function, because importing the package rebinds `slimkit.<name>` to it anyway.
        return importlib.import_module(f"slimkit.{name}")
    for info in pkgutil.iter_modules(__path__):
        if not info.ispkg or info.name in _SUBMODULES or info.name in ("cli", "testing"):
            continue
        module = importlib.import_module(f"slimkit.{info.name}")
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)

"""Neural architecture search: MobileNetV2/EfficientNet-style and cell-based spaces; random,
regularized-evolution, REINFORCE and gradient-based (supernet) strategies; exact MACs/params and a
per-unit latency lookup table as hard constraints; Optuna storage so many workers share one study.

    import slimkit as sk
    from slimkit.search import NASConfig, nas_search
    result = nas_search(sk.data.digits(), NASConfig(strategy="evolution", trials=30, max_macs=4_000_000),
                        out_dir="nas-out")
    model = sk.load("nas-out/best.safetensors")

Module names are NAS-specific (`space`, `cost`, `strategies`, `gradient`, `nas`) so other searches
(e.g. compression policies) can live beside them.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["NASConfig", "nas_search", "Constraints", "LatencyTable", "MBConvSpace", "CellSpace"]

_LAZY = {"NASConfig": "slimkit.search.nas", "Constraints": "slimkit.search.cost",
         "LatencyTable": "slimkit.search.cost", "MBConvSpace": "slimkit.search.space",
         "CellSpace": "slimkit.search.space"}


def __getattr__(name: str) -> Any:
    # lazy, so `import slimkit` (which scans packages' __all__) does not import optuna
    if name == "nas_search":
        return importlib.import_module("slimkit.search.nas").search
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimkit.search' has no attribute {name!r}")

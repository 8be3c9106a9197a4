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

# name -> module that defines it; resolved on first attribute access (PEP 562). Every public name is
# listed: `sk.PruneConfig` imports slimkit.prune and nothing else.
_LAZY = {
    "train": "slimkit.core.trainer",
    "TrainConfig": "slimkit.core.trainer",
    "Task": "slimkit.core.task",
    "Config": "slimkit.core.config",
    "Selector": "slimkit.core.selector",
    "RecoveryConfig": "slimkit.core.recovery",
    "save": "slimkit.core.artifact",
    "load": "slimkit.core.artifact",
    "register_builder": "slimkit.core.artifact",
    "Metrics": "slimkit.evaluate",
    "apply": "slimkit.core.registry",
    "techniques": "slimkit.core.registry",
    # slimkit.arch
    "separable": "slimkit.arch",
    "SeparableConfig": "slimkit.arch",
    "conversion_report": "slimkit.arch",
    # slimkit.distill
    "distill_model": "slimkit.distill",
    "DistillConfig": "slimkit.distill",
    "FeatureLink": "slimkit.distill",
    "soft_target_loss": "slimkit.distill",
    "hint_loss": "slimkit.distill",
    "attention_loss": "slimkit.distill",
    "attention_map": "slimkit.distill",
    "recover": "slimkit.distill",
    "finetune": "slimkit.distill",
    "train_student": "slimkit.distill",
    "build_student": "slimkit.distill",
    # slimkit.lowrank
    "factorize": "slimkit.lowrank",
    "LowRankConfig": "slimkit.lowrank",
    "factorization_report": "slimkit.lowrank",
    # slimkit.pipeline
    "StageOutcome": "slimkit.pipeline",
    "run_stage": "slimkit.pipeline",
    "evaluate_stage": "slimkit.pipeline",
    "Recipe": "slimkit.pipeline",
    "load_recipe": "slimkit.pipeline",
    "compress": "slimkit.pipeline",
    # slimkit.prune
    "pack": "slimkit.prune",
    "PruneConfig": "slimkit.prune",
    "StructuredPruneConfig": "slimkit.prune",
    "HeadPruneConfig": "slimkit.prune",
    "PackConfig": "slimkit.prune",
    "sensitivity_analysis": "slimkit.prune",
    "allocate_sparsity": "slimkit.prune",
    "check_nm": "slimkit.prune",
    "write_packed": "slimkit.prune",
    "read_packed": "slimkit.prune",
    "packed_info": "slimkit.prune",
    # slimkit.quantize
    "QuantConfig": "slimkit.quantize",
    "MixedPrecisionConfig": "slimkit.quantize",
    "QuantSpec": "slimkit.quantize",
    "export_quantized": "slimkit.quantize",
    "check_parity": "slimkit.quantize",
    "sqnr_db": "slimkit.quantize",
    "quantize_pt2e": "slimkit.quantize",
    "Pt2eConfig": "slimkit.quantize",
    "blame": "slimkit.quantize",
    "float_layer_weights": "slimkit.quantize",
    # slimkit.search
    "NASConfig": "slimkit.search",
    "nas_search": "slimkit.search",
    "Constraints": "slimkit.search",
    "LatencyTable": "slimkit.search",
    "MBConvSpace": "slimkit.search",
    "CellSpace": "slimkit.search",
}
# packages: `sk.distill`, `sk.prune`, `sk.quantize`, `sk.evaluate`, `sk.export` are the packages themselves,
# callable as their verb (core/verbs.py), never the same-named function
_SUBMODULES = {"data", "zoo", "errors", "evaluate", "export", "report", "core",
               "arch", "distill", "lowrank", "pipeline", "prune", "quantize", "search"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"slimkit.{name}")
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)

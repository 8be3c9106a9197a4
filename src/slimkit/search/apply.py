"""Registers NAS as a technique ("nas") so recipes can run a search as a stage.

The stage's input model is the reference: `max_macs_ratio` budgets are relative to its MACs. The
stage returns the chosen architecture, trained; its source is the architecture spec (factory
`slimkit.search.space:build`), so `slimkit.load` rebuilds it without user code.
"""
from __future__ import annotations

import tempfile

import torch.nn as nn

from slimkit.core import registry
from slimkit.core.registry import chained
from slimkit.core.state import record_stage
from slimkit.errors import ConfigError
from slimkit.search.nas import NASConfig


@chained("nas")
def apply(model: nn.Module, config: NASConfig, *, task=None, out_dir: str | None = None,
          progress: bool = True) -> nn.Module:
    """Search an architecture for `task` under `config`'s constraints; returns the chosen, trained
    model (a new module; `model` is only measured, never changed)."""
    from slimkit.search.nas import search

    if task is None:
        raise ConfigError("nas needs data: pass task=... (the candidates are trained on it)")
    out_dir = out_dir or tempfile.mkdtemp(prefix="slimkit-nas-")
    result = search(task, config, out_dir=out_dir, reference=model, progress=progress)
    if result.model is None:
        raise ConfigError("nas: no trial completed; see the study's failures in " + str(out_dir))
    best = result.best
    new = result.model
    new.slimkit_notes = [f"NAS {config.strategy}: trial {best['trial']} of {len(result.rows)}, "
                         f"val accuracy {100 * best['val_accuracy']:.2f}% after {config.epochs} proxy epoch(s)"
                         + (f" (mean {100 * best['val_accuracy_mean']:.2f}% over {best['fresh_seeds']} "
                            "fresh seeds)" if "val_accuracy_mean" in best else "") + "; "
                         f"report in {out_dir}"]
    if result.info.get("warning"):
        new.slimkit_notes.append(f"WARNING: {result.info['warning']}")
    return record_stage(new, "nas", config, {"trial": best["trial"], "out_dir": str(out_dir)})


registry.register(registry.Technique(
    name="nas", family="search", config_cls=NASConfig, apply=apply,
    summary="neural architecture search (random / evolution / REINFORCE / supernet) under MACs, params or latency limits",
    restore=None, demo=lambda model, task: None, runtime="torch", order=90))

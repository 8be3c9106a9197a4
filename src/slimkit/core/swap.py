"""The skeleton of a technique that swaps layers for new modules (factorize, separable): plan which
selected layers change and why the others do not, record the result, say it in notes, recover, and
rebuild the architecture on load.

    plan = SwapPlan("factorize", "factorize", exact_names(config.selector))
    for name, layer in selected:
        if reason := why_not(layer):
            plan.skip(name, reason)          # an error instead when the user named the layer exactly
            continue
        set_submodule(new, name, replacement)
        plan.layers[name] = {"params_before": ..., "params_after": ..., ...}   # what `restore` needs
    new = plan.finish(new, model, config, task, teacher=model, done="layer(s) factorized", line=...)

and, registered as the technique's `restore`, `restore_swaps(model, structure, "factorize", build)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from slimkit.core.selector import Selector, get_submodule, set_submodule
from slimkit.core.state import last_stage, record_stage
from slimkit.core.task import Task
from slimkit.errors import ConfigError, UnsupportedLayerError


def exact_names(selector: Selector) -> set[str]:
    """The include patterns that name one layer exactly (no wildcard): asking for such a layer and not
    getting it is an error, not a skip."""
    return {p for p in selector.include if not any(ch in p for ch in "*?[")}


@dataclass
class SwapPlan:
    """What a layer-swapping stage did: `layers` {name: info} swapped (info has params_before /
    params_after, plus what `restore` needs) and `skipped` {name: reason}."""

    technique: str
    verb: str  # "factorize", "convert": in "cannot <verb> layer ..."
    named: set[str]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, name: str, reason: str, *, unsupported: bool = True) -> None:
        """Leave layer `name` alone for `reason`; a layer the technique cannot handle (`unsupported`)
        that the user named exactly raises `UnsupportedLayerError` instead."""
        if unsupported and name in self.named:
            raise UnsupportedLayerError(f"{self.technique}: cannot {self.verb} layer {name!r}: {reason}")
        self.skipped[name] = reason

    def notes(self, done: str, line: Callable[[dict[str, Any]], str]) -> list[str]:
        """A summary ("<technique>: 3 <done> (a -> b params in those layers)"), one `line(info)` per
        swapped layer, one per skipped layer."""
        if self.layers:
            p0 = sum(v["params_before"] for v in self.layers.values())
            p1 = sum(v["params_after"] for v in self.layers.values())
            notes = [f"{self.technique}: {len(self.layers)} {done} ({p0:,} -> {p1:,} params in those layers)"]
        else:
            notes = [f"{self.technique}: no layer was changed (see skipped layers)"]
        notes += [f"{self.technique}: {n}: {line(v)}" for n, v in self.layers.items()]
        return notes + [f"{self.technique}: skipped {n}: {why}" for n, why in self.skipped.items()]

    def finish(self, new: nn.Module, model: nn.Module, config: Any, task: Task | None, *, teacher: nn.Module,
               done: str, line: Callable[[dict[str, Any]], str]) -> nn.Module:
        """Record the stage on `new` (the copy of `model` with the swaps), set its notes, and run
        `config.recovery` (distilling from `teacher`) when something was swapped."""
        from slimkit.core.recovery import recover, recovery_note

        record_stage(new, self.technique, config, {"layers": self.layers, "skipped": self.skipped})
        new.slimkit_notes = list(getattr(model, "slimkit_notes", []) or []) + self.notes(done, line)
        if not self.layers:
            return new
        verb = "recover (KD)" if config.recovery.method == "distill" else "fine-tune"
        new = recover(new, teacher, task, config.recovery, description=f"{self.technique}: {verb}")
        new.slimkit_notes = new.slimkit_notes + recovery_note(new, self.technique)  # the copy kept them
        return new


def swap_report(model: nn.Module, technique: str) -> dict[str, Any]:
    """The structure of the last `technique` stage applied to `model` ({"layers": ..., "skipped": ...})."""
    stage = last_stage(model, technique)
    return stage["structure"] if stage else {"layers": {}, "skipped": {}}


def restore_swaps(model: nn.Module, structure: dict[str, Any], technique: str, kinds: dict[str, Any], kind_key: str,
                  build: Callable[[Any, nn.Module, dict[str, Any]], nn.Module]) -> nn.Module:
    """Rebuild a swapping stage's architecture on a freshly built model (weights are loaded afterwards):
    each recorded layer becomes `build(kinds[info[kind_key]], original layer, info)`."""
    for name, info in structure.get("layers", {}).items():
        kind = info.get(kind_key)
        if kind not in kinds:
            raise ConfigError(f"{technique} stage: unknown {kind_key} {kind!r} for layer {name!r}")
        set_submodule(model, name, build(kinds[kind], get_submodule(model, name), info))
    return model

"""Unstructured and N:M pruning with one-shot, iterative and gradual (AGP) schedules.

    small = slimkit.prune(model, slimkit.PruneConfig(sparsity=0.9, scope="global"), task=task)

The result holds ordinary parameters whose pruned entries are exactly zero (no masks, no hooks).
Dense PyTorch kernels do not skip zeros, so the gain is on disk: `slimkit.pack` / the stage
artifact store the weights sparse.
"""
from __future__ import annotations

import torch.nn as nn

from slimkit.core.registry import chained
from slimkit.core.state import copy_model, record_stage
from slimkit.core.task import Task
from slimkit.core.recovery import keep_zeros, recover, recovery_note
from slimkit.errors import ConfigError, UnsupportedLayerError
from slimkit.prune.config import PruneConfig
from slimkit.prune.masks import (
    apply_masks,
    check_nm,
    global_masks,
    importance_scores,
    layer_masks,
    nm_masks,
    nm_supported,
    prunable_layers,
    resolve_layer_sparsity,
    sparsity_of,
)


def _needs_task(config: PruneConfig) -> str | None:
    if config.importance == "taylor":
        return "importance='taylor'"
    if config.scope == "sensitivity":
        return "scope='sensitivity'"
    if config.recovery.active:
        return f"recovery {config.recovery.method!r} for {config.recovery.epochs} epoch(s)"
    return None


class _Planner:
    """Computes masks for a fraction of the way to the final sparsity (1.0 = final)."""

    def __init__(self, config: PruneConfig, names: list[str], per_layer: dict[str, float] | None, task: Task | None):
        self.config, self.names, self.per_layer, self.task = config, names, per_layer, task

    def masks(self, model: nn.Module, progress: float, *, importance: str | None = None):
        cfg = self.config
        scores = importance_scores(model, self.names, importance or cfg.importance, self.task, cfg.taylor_batches)
        if cfg.nm is not None:
            return nm_masks(scores, *cfg.nm)
        if self.per_layer is None:  # global threshold
            return global_masks(scores, self._ramp(cfg.sparsity, progress))
        return layer_masks(scores, {n: self._ramp(s, progress) for n, s in self.per_layer.items()})

    def _ramp(self, final: float, progress: float) -> float:
        if progress >= 1.0:
            return final
        if self.config.schedule == "iterative":
            # geometric: every round removes the same fraction of the remaining weights (Han et al.)
            return 1.0 - (1.0 - final) ** progress
        # gradual: cubic AGP ramp (Zhu & Gupta 2017), fast early, slow near the target
        return final * (1.0 - (1.0 - progress) ** 3)


@chained("prune")
def prune_unstructured(model: nn.Module, config: PruneConfig | None = None, *, task: Task | None = None) -> nn.Module:
    """Prune weights of the selected layers to `config.sparsity` (or N:M) and fine-tune; returns a new
    model with real zeros. The input model is not modified."""
    config = config or PruneConfig()
    reason = _needs_task(config)
    if reason and task is None:
        raise ConfigError(f"PruneConfig {reason} needs data: pass task= (or set recovery='none')")
    if config.schedule == "gradual" and not config.recovery.active:
        raise ConfigError("PruneConfig schedule='gradual' prunes during fine-tuning: set recovery.epochs > 0 "
                          "and recovery.method to 'finetune' or 'distill'")
    teacher = model
    new = copy_model(model)
    layers = prunable_layers(new, config.selector)
    names = [n for n, _ in layers]
    notes: list[str] = []
    structure: dict = {}

    if config.nm is not None:
        n_keep, m = config.nm
        skipped = [n for n, mod in layers if not nm_supported(mod.weight, m)]
        names = [n for n in names if n not in skipped]
        if not names:
            raise UnsupportedLayerError(f"{config.pattern} sparsity: no selected layer has a fan-in divisible by {m} "
                                        f"(layers: {', '.join(skipped)})")
        if skipped:
            notes.append(f"{config.pattern}: layers kept dense (fan-in not a multiple of {m}): {', '.join(skipped)}")

    per_layer: dict[str, float] | None = None
    sensitivity = None
    if config.nm is None and config.scope == "layer":
        per_layer = resolve_layer_sparsity(names, config.sparsity, config.layer_sparsity)
    elif config.nm is None and config.scope == "sensitivity":
        from slimkit.prune.sensitivity import allocate_sparsity, sensitivity_analysis
        from slimkit.core.selector import Selector

        analysis = sensitivity_analysis(new, task, grid=config.sensitivity_grid,
                                        selector=Selector(include=names, types=[]), importance=config.importance)
        per_layer = allocate_sparsity(analysis, config.sparsity)
        sensitivity = {**analysis, "chosen": per_layer}
        notes.append("sensitivity-chosen sparsity: " + ", ".join(f"{n} {100 * s:.1f}%" for n, s in per_layer.items()))
        # the curves themselves go to the report as a heatmap (`slimkit_sensitivity`), not into the notes

    planner = _Planner(config, names, per_layer, task)
    if config.nm is not None or config.schedule == "oneshot":
        masks = planner.masks(new, 1.0)
        apply_masks(new, masks)
        new = recover(new, teacher, task, config.recovery, seed=config.seed, on_step=keep_zeros(new),
                      description="prune: fine-tune")
        notes += recovery_note(new, "prune")
    elif config.schedule == "iterative":
        epochs_left = config.recovery.epochs
        for k in range(1, config.steps + 1):
            masks = planner.masks(new, k / config.steps)
            apply_masks(new, masks)
            epochs = epochs_left // (config.steps - k + 1)
            epochs_left -= epochs
            new = recover(new, teacher, task, config.recovery, seed=config.seed, on_step=keep_zeros(new),
                          epochs=epochs, description=f"prune: round {k}/{config.steps}")
    else:  # gradual
        new = _gradual(new, teacher, task, config, planner)
        masks = planner.masks(new, 1.0, importance="l1")
    apply_masks(new, masks)  # finalize: the zeros are real, nothing else remains

    achieved = sparsity_of(new, names)
    if config.nm is not None:
        ok = all(check_nm(new.get_submodule(n).weight, *config.nm) for n in names)
        structure["nm_verified"] = ok
        notes.append(f"{config.pattern} sparsity verified per group: {ok}")
    structure["sparsity"] = round(achieved, 6)
    structure["layers"] = {n: round(sparsity_of(new, [n]), 6) for n in names}
    notes.append(f"{100 * achieved:.1f}% of the selected weights are zero; dense PyTorch kernels still compute "
                 "them (no speed-up claimed), the .slim artifact stores them sparse")
    record_stage(new, "prune", config, structure)
    new.slimkit_notes = list(getattr(model, "slimkit_notes", []) or []) + notes
    if sensitivity is not None:
        new.slimkit_sensitivity = sensitivity  # the curves, for reports and plots
    return new


def _gradual(model: nn.Module, teacher: nn.Module, task: Task, config: PruneConfig, planner: _Planner) -> nn.Module:
    """Fine-tune while the sparsity follows the AGP ramp over the first 3/4 of the steps, then
    fine-tune with the final mask for the rest."""
    total = len(task.loader("train")) * config.recovery.epochs
    ramp_end = max(1, int(0.75 * total))
    every = max(1, ramp_end // 20)  # re-prune ~20 times along the ramp
    state = {"masks": planner.masks(model, 0.0, importance="l1")}

    def on_step(m: nn.Module, step: int) -> None:
        if step % every == 0 or step == ramp_end:
            # magnitude importance inside the loop: a Taylor pass per update would double the cost
            state["masks"] = planner.masks(m, min(1.0, step / ramp_end), importance="l1")
        apply_masks(m, state["masks"])

    # no early stopping: an earlier epoch's weights are a less sparse model
    return recover(model, teacher, task, config.recovery, seed=config.seed, on_step=on_step,
                   description="prune: gradual", patience=None)

"""Sensitivity analysis: accuracy of the model when one layer alone is pruned to each sparsity of a
grid (no fine-tuning), and the per-layer sparsities it implies under a global target."""
from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.core.progress import progress_bar
from slimkit.core.selector import Selector, get_submodule
from slimkit.core.task import Task
from slimkit.core.trainer import accuracy
from slimkit.errors import InfeasibleError
from slimkit.prune.masks import importance_scores, layer_masks, prunable_layers


@torch.no_grad()
def sensitivity_analysis(model: nn.Module, task: Task, *, grid: list[float] | None = None,
                         selector: Selector | None = None, importance: str = "l1",
                         split: str = "val") -> dict:
    """Per-layer accuracy-vs-sparsity curves.

    Returns {"baseline": accuracy, "curves": {layer: [[sparsity, accuracy], ...]}, "sizes": {layer: n}}.
    The model is not modified (each layer's weight is restored after its measurement).
    """
    grid = sorted(grid or [0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    layers = prunable_layers(model, selector, what="sensitivity")
    names = [n for n, _ in layers]
    with torch.enable_grad():
        scores = importance_scores(model, names, importance, task)
    baseline = accuracy(model, task, split)
    curves: dict[str, list[list[float]]] = {}
    with progress_bar("sensitivity", len(names) * len(grid)) as advance:
        for name in names:
            weight = get_submodule(model, name).weight
            original = weight.detach().clone()
            curves[name] = []
            for s in grid:
                mask = layer_masks({name: scores[name]}, {name: s})[name]
                weight.mul_(mask)
                curves[name].append([s, accuracy(model, task, split)])
                weight.copy_(original)
                advance(1, layer=name)
    return {"baseline": baseline, "curves": curves, "sizes": {n: get_submodule(model, n).weight.numel() for n in names}}


def allocate_sparsity(analysis: dict, target: float) -> dict[str, float]:
    """Per-layer sparsities that reach `target` over all analysed weights while keeping the
    worst single-layer accuracy drop as small as possible.

    For a tolerated drop t, each layer takes the largest grid sparsity whose drop (and the drops
    of all lower sparsities) is <= t; the smallest t reaching the target is chosen, and the last
    step is interpolated so the overall sparsity equals `target` exactly.
    """
    baseline, curves, sizes = analysis["baseline"], analysis["curves"], analysis["sizes"]
    total = sum(sizes.values())
    # running max: a layer may not jump over a sparsity that already hurt more than t
    drops = {}
    for name, curve in curves.items():
        worst, points = 0.0, []
        for s, acc in curve:
            worst = max(worst, baseline - acc)
            points.append((s, worst))
        drops[name] = points

    def allocation(tolerance: float) -> dict[str, float]:
        return {n: max([s for s, d in pts if d <= tolerance], default=0.0) for n, pts in drops.items()}

    def overall(alloc: dict[str, float]) -> float:
        return sum(sizes[n] * s for n, s in alloc.items()) / total

    candidates = sorted({d for pts in drops.values() for _, d in pts})
    previous = {n: 0.0 for n in drops}
    for tol in candidates:
        current = allocation(tol)
        reached = overall(current)
        if reached >= target:
            before = overall(previous)
            alpha = (target - before) / max(reached - before, 1e-12)
            return {n: previous[n] + alpha * (current[n] - previous[n]) for n in drops}
        previous = current
    raise InfeasibleError(f"sensitivity allocation: the grid reaches at most {100 * overall(previous):.1f}% "
                          f"sparsity, below the target {100 * target:.1f}%; extend sensitivity_grid")

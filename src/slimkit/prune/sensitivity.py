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
    """Per-layer sparsities that reach `target` over all analysed weights at the least measured cost.

    Greedy on the curves: repeatedly take the next grid step of the layer whose accuracy drop grows
    least per weight removed (so big, robust layers are pruned first and small sensitive ones
    last); the final step is interpolated so the overall sparsity equals `target` exactly.
    Drops are made monotone (a running maximum) so a noisy curve cannot skip a harmful sparsity.
    """
    baseline, curves, sizes = analysis["baseline"], analysis["curves"], analysis["sizes"]
    total = sum(sizes.values())
    steps: dict[str, list[tuple[float, float]]] = {}
    for name, curve in curves.items():
        worst, points = 0.0, [(0.0, 0.0)]
        for s, acc in sorted(curve):
            worst = max(worst, baseline - acc)
            points.append((s, worst))
        steps[name] = points
    position = {n: 0 for n in steps}
    alloc = {n: 0.0 for n in steps}
    need = target * total
    zeros = 0.0
    while zeros < need - 1e-9:
        best, best_cost = None, None
        for n, pts in steps.items():
            i = position[n]
            if i + 1 >= len(pts):
                continue
            gained = sizes[n] * (pts[i + 1][0] - pts[i][0])
            cost = (pts[i + 1][1] - pts[i][1]) / max(gained, 1e-12)
            if best_cost is None or cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            raise InfeasibleError(f"sensitivity allocation: the grid reaches at most {100 * zeros / total:.1f}% "
                                  f"sparsity, below the target {100 * target:.1f}%; extend sensitivity_grid")
        i = position[best]
        (s0, _), (s1, _) = steps[best][i], steps[best][i + 1]
        gained = sizes[best] * (s1 - s0)
        if zeros + gained >= need:  # partial last step: land exactly on the target
            alloc[best] = s0 + (need - zeros) / sizes[best]
            break
        zeros += gained
        alloc[best] = s1
        position[best] = i + 1
    return alloc

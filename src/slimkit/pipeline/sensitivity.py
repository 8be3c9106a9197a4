"""Per-layer sensitivity of a model to each technique family, measured on validation data.

One layer at a time is perturbed the way a technique would change it (sparsity by magnitude,
truncated SVD by kept energy, weights rounded to b bits), the validation accuracy measured, and
the weight restored. The advisor explains its recommendation with these curves and the report
draws them as heatmaps. Format of every analysis (the same as `slimkit.prune.sensitivity`):

    {"baseline": accuracy, "curves": {layer: [[grid_value, accuracy], ...]}, "sizes": {layer: n}}
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from slimkit.core.progress import progress_bar
from slimkit.core.selector import Selector, select
from slimkit.core.task import Task
from slimkit.core.trainer import accuracy


def _layers(model: nn.Module, selector: Selector | None) -> list[tuple[str, nn.Module]]:
    return select(model, selector, default_types=(nn.Linear, nn.Conv2d), what="sensitivity")


def perturbation_curves(model: nn.Module, task: Task, grid: list, perturb: Callable[[torch.Tensor, object], torch.Tensor],
                        *, selector: Selector | None = None, split: str = "val", what: str = "sensitivity") -> dict:
    """Accuracy after replacing each selected layer's weight by `perturb(weight, value)` alone."""
    layers = _layers(model, selector)
    model = model.eval()
    baseline = accuracy(model, task, split)
    curves: dict[str, list[list[float]]] = {}
    with torch.no_grad(), progress_bar(what, len(layers) * len(grid)) as advance:
        for name, layer in layers:
            original = layer.weight.detach().clone()
            curves[name] = []
            for value in grid:
                layer.weight.copy_(perturb(original, value))
                curves[name].append([value, accuracy(model, task, split)])
                layer.weight.copy_(original)
                advance(1, layer=name)
    return {"baseline": baseline, "curves": curves, "sizes": {n: m.weight.numel() for n, m in layers}}


def truncate_energy(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """Best rank-r approximation of the weight (matricized out x rest) keeping `energy` of the
    squared singular values (the rank an SVD factorization at that energy would keep)."""
    matrix = weight.reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    kept = torch.cumsum(s**2, 0) / (s**2).sum()
    rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
    rank = min(rank, len(s))
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape).to(weight.dtype)


def round_weights(weight: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Weights rounded to a symmetric signed `bits`-bit grid (round to nearest, min-max range)."""
    from slimkit.quantize.numerics import QuantSpec, dequantize, qparams, quantize, tensor_range

    spec = QuantSpec(bits=int(bits), signed=True, symmetric=True, granularity="channel" if per_channel else "tensor")
    lo, hi = tensor_range(weight, spec)
    scale, zp = qparams(lo, hi, spec)
    return dequantize(quantize(weight, scale, zp, spec), scale, zp, spec).to(weight.dtype)


def rank_sensitivity(model: nn.Module, task: Task, *, grid: list[float] | None = None,
                     selector: Selector | None = None, split: str = "val") -> dict:
    return perturbation_curves(model, task, grid or [0.99, 0.95, 0.9, 0.8, 0.6], truncate_energy,
                               selector=selector, split=split, what="sensitivity (rank)")


def bits_sensitivity(model: nn.Module, task: Task, *, grid: list[int] | None = None, per_channel: bool = True,
                     selector: Selector | None = None, split: str = "val") -> dict:
    return perturbation_curves(model, task, grid or [8, 6, 4, 3, 2],
                               lambda w, b: round_weights(w, b, per_channel),
                               selector=selector, split=split, what="sensitivity (bits)")


def sparsity_sensitivity(model: nn.Module, task: Task, *, grid: list[float] | None = None,
                         selector: Selector | None = None, split: str = "val") -> dict:
    from slimkit.prune.sensitivity import sensitivity_analysis

    return sensitivity_analysis(model, task, grid=grid or [0.5, 0.7, 0.8, 0.9, 0.95], selector=selector, split=split)


def analyse(model: nn.Module, task: Task, *, selector: Selector | None = None, split: str = "val") -> dict[str, dict]:
    """All three families, plus per-tensor vs per-channel int8 weights for each layer."""
    return {
        "sparsity": sparsity_sensitivity(model, task, selector=selector, split=split),
        "rank": rank_sensitivity(model, task, selector=selector, split=split),
        "bits": bits_sensitivity(model, task, selector=selector, split=split),
        "bits_per_tensor": bits_sensitivity(model, task, grid=[8, 4], per_channel=False, selector=selector, split=split),
    }

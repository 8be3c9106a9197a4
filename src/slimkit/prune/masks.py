"""Weight importance, masks (global, per-layer, N:M) and keeping masks applied while training.

Masks live in a plain dict {layer name: bool tensor} next to the model, never as hooks or
`weight_orig`/`weight_mask` pairs: applying them multiplies the weights in place, so when
pruning finishes the model holds ordinary parameters with real zeros.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from slimkit.core.selector import Selector, get_submodule, select
from slimkit.core.task import Task
from slimkit.errors import ConfigError, UnsupportedLayerError

#: layer types whose `weight` is pruned by default
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Masks = dict[str, torch.Tensor]


def prunable_layers(model: nn.Module, selector: Selector | None, what: str = "prune") -> list[tuple[str, nn.Module]]:
    """Selected layers that own a `weight` parameter; raises SelectorError when none match."""
    layers = select(model, selector, default_types=PRUNABLE, what=what)
    bad = [n for n, m in layers if not isinstance(getattr(m, "weight", None), nn.Parameter)]
    if bad:
        raise UnsupportedLayerError(f"{what}: layer {bad[0]!r} has no weight parameter to prune")
    return layers


def taylor_scores(model: nn.Module, names: list[str], task: Task, batches: int = 8) -> dict[str, torch.Tensor]:
    """|weight x gradient| of the task loss, summed over `batches` training batches."""
    was_training = model.training
    model.eval()  # BN statistics must not move while we only measure
    scores = {n: torch.zeros_like(get_submodule(model, n).weight) for n in names}
    loader = task.loader("train", batch_size=task.batch_size, shuffle=True, seed=0)
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        model.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        for n in names:
            w = get_submodule(model, n).weight
            if w.grad is not None:
                scores[n] += (w.detach() * w.grad.detach()).abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


def importance_scores(model: nn.Module, names: list[str], kind: str, task: Task | None = None,
                      batches: int = 8) -> dict[str, torch.Tensor]:
    """Per-weight importance: "l1" |w|, "l2" w^2, or "taylor" |w x grad|."""
    if kind == "taylor":
        if task is None:
            raise ConfigError("importance='taylor' needs data: pass task=")
        return taylor_scores(model, names, task, batches)
    weights = {n: get_submodule(model, n).weight.detach() for n in names}
    if kind == "l2":
        return {n: w.pow(2) for n, w in weights.items()}
    return {n: w.abs() for n, w in weights.items()}


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask keeping all but the `count` lowest-scored entries (exactly `count` pruned; ties broken by index)."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        mask[torch.topk(scores.flatten(), count, largest=False, sorted=False).indices] = False
    return mask.view_as(scores)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> Masks:
    """One threshold across all layers: exactly round(sparsity x total) weights pruned overall."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float() for n in names])
    mask = _prune_lowest(flat, int(round(sparsity * flat.numel())))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = mask[start:start + size].view_as(scores[n])
        start += size
    return out


def layer_masks(scores: dict[str, torch.Tensor], sparsities: dict[str, float]) -> Masks:
    """Each layer pruned to its own sparsity."""
    return {n: _prune_lowest(s, int(round(sparsities[n] * s.numel()))) for n, s in scores.items()}


def nm_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as (output, fan-in) rows; N:M groups are M consecutive fan-in entries of one row."""
    return weight.reshape(weight.shape[0], -1)


def nm_supported(weight: torch.Tensor, m: int) -> bool:
    return nm_rows(weight).shape[1] % m == 0


def nm_masks(scores: dict[str, torch.Tensor], n: int, m: int) -> Masks:
    """Keep the `n` highest-scored of every `m` consecutive fan-in weights."""
    out = {}
    for name, s in scores.items():
        rows = nm_rows(s)
        if rows.shape[1] % m:
            raise UnsupportedLayerError(f"layer {name!r}: fan-in {rows.shape[1]} is not a multiple of {m} "
                                        f"for {n}:{m} sparsity; exclude it from the selector")
        groups = rows.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
        out[name] = keep.reshape(s.shape)
    return out


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive fan-in weights has at most `n` non-zeros."""
    rows = nm_rows(weight)
    if rows.shape[1] % m:
        return False
    return bool(((rows.reshape(-1, m) != 0).sum(1) <= n).all())


def resolve_layer_sparsity(names: list[str], default: float, overrides: dict[str, float]) -> dict[str, float]:
    """Per-layer sparsity: the first override pattern matching a layer name wins, else `default`."""
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            from slimkit.errors import SelectorError

            raise SelectorError(f"layer_sparsity pattern {pattern!r} matches no selected layer; "
                                f"selected: {', '.join(names)}")
    out = {}
    for n in names:
        out[n] = next((s for p, s in overrides.items() if fnmatch.fnmatchcase(n, p)), default)
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Zero the masked-out weights in place."""
    for name, mask in masks.items():
        w = get_submodule(model, name).weight
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    return model


def sparsity_of(model: nn.Module, names: list[str]) -> float:
    """Fraction of zeros over the weights of the named layers."""
    total = zeros = 0
    for n in names:
        w = get_submodule(model, n).weight
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / max(total, 1)

"""Least-squares refit of the last linear layer of a replacement block, on calibration activations.

Shared by `separable` (the pointwise / projection 1x1) and data-aware `factorize` (the last
factor): with everything before it fixed, the layer's weight and bias are solved so that the
block reproduces the original layer's output. The block's inputs come from the partially
converted model, so each fit also absorbs the error of the layers converted before it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.core.task import Task
from slimkit.errors import CalibrationError


class _Stop(Exception):
    """Raised by a hook once the activations it needs are captured (skips the rest of the forward)."""


def _run_until(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except _Stop:
        pass


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C); (N, ..., C) -> (N*..., C)."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def refit_last_layer(original: nn.Module, original_layer: nn.Module, converted: nn.Module, block: nn.Module,
                     last: nn.Module, task: Task, *, samples: int, ridge: float, residual: bool = False) -> float:
    """Solve `last` (a 1x1 Conv2d or Linear with bias, the final layer of `block`) by ridge least
    squares so that `block` (inside `converted`) matches `original_layer` (inside `original`) on
    `samples` calibration inputs; `residual`: the block adds its input to `last`'s output.
    Returns the relative residual error."""
    captured: dict[str, torch.Tensor] = {}

    def grab_target(_m, _inp, out):
        captured["target"] = out
        raise _Stop

    def grab_features(_m, inp):
        captured["features"] = inp[0]

    def grab_block_input(_m, inp, _out):
        captured["input"] = inp[0]
        raise _Stop

    handles = [original_layer.register_forward_hook(grab_target), last.register_forward_pre_hook(grab_features),
               block.register_forward_hook(grab_block_input)]
    gram = rhs = None
    target_energy = 0.0
    n = 0
    try:
        for x in task.calibration_batches(max_samples=samples):
            if not torch.isfinite(x).all():
                raise CalibrationError(f"calibration data of {task.name!r} contains NaN or Inf")
            _run_until(original, x)
            _run_until(converted, x)
            y = captured["target"].float()
            if residual:
                y = y - captured["input"].float()
            z = _rows(captured["features"].float())
            z = torch.cat([z, torch.ones(len(z), 1)], 1)
            y = _rows(y)
            # products per batch in float32 (fast), sums across batches in float64 (accurate)
            g, r = (z.T @ z).double(), (z.T @ y).double()
            gram = g if gram is None else gram + g
            rhs = r if rhs is None else rhs + r
            target_energy += float((y.double() ** 2).sum())
            n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise CalibrationError(f"calibration split of {task.name!r} is empty")
    # ridge relative to the mean feature energy keeps the solve well posed for dead channels
    reg = ridge * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=torch.float64)
    reg[-1, -1] = 0.0  # do not shrink the bias
    solution = torch.linalg.solve(gram + reg, rhs)  # (features + 1, outputs)
    weight, bias = solution[:-1].T, solution[-1]
    last.weight.copy_(weight.reshape(last.weight.shape).to(last.weight.dtype))
    last.bias.copy_(bias.to(last.bias.dtype))
    # residual energy ||y - z P||^2 = ||y||^2 - 2 tr(P^T rhs) + tr(P^T gram P)
    error = target_energy - 2 * float((solution * rhs).sum()) + float((solution * (gram @ solution)).sum())
    return max(error, 0.0) / max(target_energy, 1e-30)



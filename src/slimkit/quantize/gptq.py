"""GPTQ (Frantar et al. 2023): second-order rounding of quantized weights, one input column at a time, each
column's rounding error compensated on the columns not yet rounded (and the pair limit of the portable
target enforced as it goes)."""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core import distributed
from slimkit.core.progress import progress_bar
from slimkit.errors import ConfigError
from slimkit.quantize.graph import weight_layers
from slimkit.quantize.modules import QuantWeightLayer
from slimkit.quantize.ptq import observe_layers


# -- GPTQ ----------------------------------------------------------------------------------------
def patches(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The columns a layer multiplies its weight with, grouped: (G, n, d) with d = in-features per group
    (times the kernel size for convolutions), and G the number of groups."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1]), 1
    pad = getattr(layer, "static_padding", None)
    if isinstance(pad, nn.Module):  # TF-"SAME" padded convs pad first (as `conv_forward` does)
        x = pad(x)
    k, stride, dil, padding = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    if isinstance(padding, str):
        if padding == "same" and all(s == 1 for s in stride):
            padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dil, k))
        elif padding == "valid":
            padding = (0,) * len(k)
        else:
            raise ConfigError(f"gptq: padding={padding!r} is not supported")
    if isinstance(layer, nn.Conv1d):  # as a 2-D convolution of height 1
        x, k, stride, dil, padding = x.unsqueeze(2), (1, *k), (1, *stride), (1, *dil), (0, *padding)
    cols = F.unfold(x, k, dilation=dil, padding=padding, stride=stride)  # (N, C*kh*kw, L), channel-major
    g = layer.groups
    cols = cols.reshape(cols.shape[0], g, -1, cols.shape[-1]).permute(1, 0, 3, 2)  # (G, N, L, d)
    return cols.reshape(g, -1, cols.shape[-1]), g


def _gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                damp: float, block: int, pair_bound: int | None = None, positions: int = 1) -> torch.Tensor:
    """GPTQ for (G, R, d) weights with per-group input Hessians h (G, d, d) and scales / zero points
    (G, R, d // block) — one per row and block of `block` input columns: round column by column,
    spreading each column's rounding error over the columns not yet rounded in proportion to the
    inverse Hessian (the error that least changes the layer's output).

    pair_bound: columns are (input channel, kernel position) with `positions` positions per channel; the
    code of channel 2i+1 is limited so that |q(2i)| + |q(2i+1)| <= pair_bound for a same-sign pair at the
    same position (`numerics.limit_pairs`), and what that costs is compensated like any rounding error."""
    w, h = w.double().clone(), h.double().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0  # inputs always zero on the calibration data: rounded to nearest, nothing compensated
    diag.add_(damp * diag.mean(1, keepdim=True))
    diag[dead] = 1.0
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    s, z = scale.double(), zero.double()
    q = torch.empty_like(w)
    for i in range(w.shape[2]):
        col, sc, zc = w[:, :, i], s[:, :, i // block], z[:, :, i // block]
        code = torch.clamp(torch.round(col / sc) + zc, qmin, qmax) - zc
        if pair_bound and (i // positions) % 2 == 1:  # symmetric codes (z = 0): the pair's first code is fixed
            j = i - positions
            first = torch.round(q[:, :, j] / s[:, :, j // block])
            room = (pair_bound - first.abs()).clamp(min=0)
            limited = code.sign() * torch.minimum(code.abs(), room)
            code = torch.where(first * code > 0, limited, code)
        qc = code * sc
        q[:, :, i] = qc
        err = (col - qc) / hinv[:, i, i, None]
        w[:, :, i + 1:] -= err[:, :, None] * hinv[:, None, i, i + 1:]
    return q


@torch.no_grad()
def gptq(model: nn.Module, batches: list, *, layers: list[str] | None = None, damp: float = 0.01,
         chunk: int = 8) -> dict[str, float]:
    """Second-order rounding of weights (GPTQ, Frantar et al. 2023, from Optimal Brain Quantization):
    each layer's weights are rounded one input column at a time, and the rounding error of a column is
    compensated on the columns not yet rounded, using H = E[x x^T] of the inputs the layer sees in the
    quantized model (one statistics pass over the calibration batches for all layers). The weight
    scales stay as calibrated (per tensor, channel or block of inputs); the chosen grid values are baked
    into the weights. Grouped and depthwise convolutions are solved per group (per-block scales across
    conv groups are skipped). Returns, per rounded layer, the output error E|(W - Q) x|^2 relative to
    round-to-nearest's (below 1: GPTQ's rounding is better on the calibration inputs; a layer where it
    is not keeps round-to-nearest)."""
    selected = {n: m for n, m in weight_layers(model).items()
                if (layers is None or any(fnmatch.fnmatchcase(n, p) for p in layers))
                and not m.dynamic and m.enabled
                # per-block scales across conv groups: not supported
                and not (m.spec.granularity == "group" and getattr(m.layer, "groups", 1) > 1)}
    if not selected:
        raise ConfigError("gptq: no quantized layer to round (static or weight-only) matches")
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, layer: QuantWeightLayer, x: torch.Tensor) -> None:
        # the unfolded patches of early convolutions are large: a few images at a time
        for part in (x,) if isinstance(layer.layer, nn.Linear) else x.split(chunk):
            cols, _ = patches(layer.layer, part.float())
            hessians[name] = hessians.get(name, 0) + cols.transpose(1, 2) @ cols
            counts[name] = counts.get(name, 0) + cols.shape[1]

    mine, split = distributed.block_shard(batches)  # under torchrun: each rank a block, the sums added up
    observe_layers(model, selected, mine, "gptq statistics", observe)
    if split:
        parts = distributed.all_gather_objects((hessians, counts))
        hessians = {n: sum(p[0][n] for p in parts if n in p[0]) for n in selected if any(n in p[0] for p in parts)}
        counts = {n: sum(p[1].get(n, 0) for p in parts) for n in hessians}
    ratios = {}
    with progress_bar("gptq", len(selected)) as advance:
        for name, layer in selected.items():
            w = layer.layer.weight.detach()
            g = getattr(layer.layer, "groups", 1)
            h = hessians[name] / counts[name]
            wg = w.reshape(g, w.shape[0] // g, -1)
            if layer.spec.granularity == "group":  # Linear: one scale per row and block of inputs
                block = layer.spec.group_size
                scale = layer.weight_scale.detach().float().reshape(1, w.shape[0], -1)
                zero = layer.weight_zero_point.detach().float().reshape(1, w.shape[0], -1)
            else:
                block, shape = wg.shape[2], (g, w.shape[0] // g, 1)
                scale = layer.weight_scale.detach().float().expand(w.shape[0]).reshape(shape)
                zero = layer.weight_zero_point.detach().float().expand(w.shape[0]).reshape(shape)
            positions = w[0, 0].numel() if w.dim() > 2 else 1  # kernel positions per input channel
            q = _gptq_round(wg, h, scale, zero, layer.spec.qmin, layer.spec.qmax, damp, block,
                            layer.spec.pair_bound, positions)
            rtn = layer.quantized_weight().detach().reshape(wg.shape).double()

            def out_err(wq: torch.Tensor) -> float:
                e = wg.double() - wq
                return float(torch.einsum("grd,gde,gre->", e, h.double(), e))

            before, after = out_err(rtn), out_err(q)
            if after < before:  # GPTQ's rounding is better on the calibration inputs (it nearly always is)
                layer.layer.weight.copy_(q.reshape(w.shape).to(w.dtype))
            ratios[name] = min(after, before) / before if before > 0 else 1.0
            advance(1, layer=name)
    return ratios

"""Cross-layer equalization (Nagel et al. 2019): rescale consecutive conv/linear pairs so that their
per-channel weight ranges match, before quantization. A graph transform of its own (used by
`graph.prepare` when `QuantConfig.equalize` is on), so it depends on nothing else in quantize."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
_RELU = (nn.ReLU,)


def equalize(gm: fx.GraphModule, iterations: int = 4) -> list[tuple[str, str]]:
    """Cross-layer equalization (Nagel et al. 2019) of consecutive conv/linear pairs joined by ReLU,
    max-pool or nothing (positively homogeneous ops). ReLU6 pairs are skipped: scaling would move
    their clipping point. Returns the equalized (first, second) layer names."""
    def mod(node):
        return gm.get_submodule(node.target) if node.op == "call_module" else None

    pairs = []
    for node in gm.graph.nodes:
        first = mod(node)
        if not isinstance(first, (nn.Conv2d, nn.Linear)):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            m = mod(nxt)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                ok = isinstance(first, type(m)) or isinstance(m, type(first))
                depthwise = isinstance(m, nn.Conv2d) and m.groups > 1
                if ok and (not depthwise or m.groups == m.in_channels == m.out_channels) and \
                        (not isinstance(m, nn.Conv2d) or m.groups in (1, m.in_channels)):
                    pairs.append((node.target, nxt.target))
                break
            if isinstance(m, _RELU + (nn.MaxPool2d, nn.Identity)) or (nxt.op == "call_function" and nxt.target in (F.relu, torch.relu)):
                cur = nxt
                continue
            break
    for _ in range(iterations):
        for a, b in pairs:
            _equalize_pair(gm.get_submodule(a), gm.get_submodule(b))
    return pairs


@torch.no_grad()
def _equalize_pair(first: nn.Module, second: nn.Module) -> None:
    w1, w2 = first.weight, second.weight
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(1)
    if isinstance(second, nn.Conv2d) and second.groups > 1:  # depthwise: input channel i is output channel i
        r2 = w2.abs().reshape(w2.shape[0], -1).amax(1)
    else:
        r2 = w2.abs().transpose(0, 1).reshape(w2.shape[1], -1).amax(1)
    s = torch.sqrt(r1 * r2).clamp(min=1e-8) / r2.clamp(min=1e-8)
    s = torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s)).clamp(1e-3, 1e3)
    w1.div_(s.reshape(-1, *[1] * (w1.dim() - 1)))
    if first.bias is not None:
        first.bias.div_(s)
    if isinstance(second, nn.Conv2d) and second.groups > 1:
        w2.mul_(s.reshape(-1, *[1] * (w2.dim() - 1)))
    else:
        w2.mul_(s.reshape(1, -1, *[1] * (w2.dim() - 2)))

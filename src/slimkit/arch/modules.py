"""MobileNet-style blocks that replace a standard convolution. Plain conv layers only, so they
export to ONNX and run on any runtime. `like(conv, ...)` builds the empty block from the layer it
replaces (used by both `separable` and `slimkit.load`)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from slimkit.core.layers import pair


def keeps_shape(conv: nn.Conv2d) -> bool:
    """True when the convolution maps (C, H, W) to (C, H, W), so a residual connection fits."""
    if conv.in_channels != conv.out_channels or pair(conv.stride) != (1, 1):
        return False
    if conv.padding == "same":
        return True
    if isinstance(conv.padding, str):
        return False
    return all(2 * p == d * (k - 1) for p, d, k in zip(pair(conv.padding), pair(conv.dilation), pair(conv.kernel_size)))


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise kxk (each input channel -> `multiplier` channels) then pointwise 1x1 (MobileNetV1)."""

    def __init__(self, conv: nn.Conv2d, multiplier: int = 1):
        hidden = conv.in_channels * multiplier
        super().__init__(OrderedDict(
            depthwise=nn.Conv2d(conv.in_channels, hidden, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                groups=conv.in_channels, bias=False, padding_mode=conv.padding_mode),
            pointwise=nn.Conv2d(hidden, conv.out_channels, 1, bias=True)))
        self.multiplier = multiplier

    @classmethod
    def like(cls, conv: nn.Conv2d, multiplier: int = 1) -> "DepthwiseSeparableConv":
        return cls(conv, multiplier)

    @property
    def projection(self) -> nn.Conv2d:
        return self.pointwise


class InvertedResidualConv(nn.Module):
    """1x1 expand -> ReLU6 -> depthwise kxk -> ReLU6 -> 1x1 project (+ input when shapes match) (MobileNetV2).

    No batch norms inside: the block replaces one convolution, and the layers that followed it
    (BN, activation) stay where they were.
    """

    def __init__(self, conv: nn.Conv2d, expansion: int = 2):
        super().__init__()
        hidden = conv.in_channels * expansion
        self.expand = nn.Conv2d(conv.in_channels, hidden, 1, bias=False)
        self.act1 = nn.ReLU6()
        self.depthwise = nn.Conv2d(hidden, hidden, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                   groups=hidden, bias=False, padding_mode=conv.padding_mode)
        self.act2 = nn.ReLU6()
        self.project = nn.Conv2d(hidden, conv.out_channels, 1, bias=True)
        self.expansion = expansion
        self.use_residual = keeps_shape(conv)

    @classmethod
    def like(cls, conv: nn.Conv2d, expansion: int = 2) -> "InvertedResidualConv":
        return cls(conv, expansion)

    @property
    def projection(self) -> nn.Conv2d:
        return self.project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.act2(self.depthwise(self.act1(self.expand(x)))))
        return x + out if self.use_residual else out


BLOCKS: dict[str, type[nn.Module]] = {"separable": DepthwiseSeparableConv, "inverted_residual": InvertedResidualConv}

"""The layers factorization produces. Each is a plain `nn.Sequential` of standard layers, so it
exports to ONNX and runs in any runtime without custom kernels; `like(layer, rank)` builds the
empty structure from the layer it replaces (used by both `factorize` and `slimkit.load`)."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from slimkit.core.layers import pair


class LowRankLinear(nn.Sequential):
    """Linear(in, out) as Linear(in, rank, no bias) -> Linear(rank, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__(OrderedDict(first=nn.Linear(in_features, rank, bias=False),
                                     second=nn.Linear(rank, out_features, bias=bias)))
        self.rank = rank

    @classmethod
    def like(cls, layer: nn.Linear, rank: int, bias: bool | None = None) -> "LowRankLinear":
        return cls(layer.in_features, layer.out_features, rank, layer.bias is not None if bias is None else bias)


class ChannelSVDConv(nn.Sequential):
    """Conv kxk (Cin -> Cout) as conv kxk (Cin -> rank, stride/padding/dilation kept) -> conv 1x1 (rank -> Cout)."""

    def __init__(self, conv: nn.Conv2d, rank: int, bias: bool | None = None):
        super().__init__(OrderedDict(
            first=nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                            bias=False, padding_mode=conv.padding_mode),
            second=nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None if bias is None else bias)))
        self.rank = rank

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int, bias: bool | None = None) -> "ChannelSVDConv":
        """bias: force a bias on the 1x1 (data-aware factors carry a mean correction); None: as `conv`."""
        return cls(conv, rank, bias)


class SpatialSVDConv(nn.Sequential):
    """Conv kh x kw as conv kh x 1 (Cin -> rank) then conv 1 x kw (rank -> Cout) (Jaderberg et al. 2014)."""

    def __init__(self, conv: nn.Conv2d, rank: int, bias: bool | None = None):
        (kh, kw), (sh, sw) = pair(conv.kernel_size), pair(conv.stride)
        (ph, pw), (dh, dw) = pair(conv.padding), pair(conv.dilation)
        super().__init__(OrderedDict(
            first=nn.Conv2d(conv.in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False),
            second=nn.Conv2d(rank, conv.out_channels, (1, kw), (1, sw), (0, pw), (1, dw),
                             bias=conv.bias is not None if bias is None else bias)))
        self.rank = rank

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int, bias: bool | None = None) -> "SpatialSVDConv":
        return cls(conv, rank, bias)


class Tucker2Conv(nn.Sequential):
    """Conv kxk as 1x1 (Cin -> r_in) -> kxk core (r_in -> r_out) -> 1x1 (r_out -> Cout) (Kim et al. 2016)."""

    def __init__(self, conv: nn.Conv2d, rank_out: int, rank_in: int, bias: bool | None = None):
        super().__init__(OrderedDict(
            first=nn.Conv2d(conv.in_channels, rank_in, 1, bias=False),
            core=nn.Conv2d(rank_in, rank_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           bias=False, padding_mode=conv.padding_mode),
            last=nn.Conv2d(rank_out, conv.out_channels, 1, bias=conv.bias is not None if bias is None else bias)))
        self.rank = [rank_out, rank_in]

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: list[int], bias: bool | None = None) -> "Tucker2Conv":
        return cls(conv, rank[0], rank[1], bias)


def last_layer(module: nn.Module) -> nn.Module:
    """The final linear layer of a factorized module (the one a least-squares refit solves)."""
    return module.last if isinstance(module, Tucker2Conv) else module.second


KINDS: dict[str, type[nn.Module]] = {"svd": LowRankLinear, "channel": ChannelSVDConv, "spatial": SpatialSVDConv,
                                     "tucker2": Tucker2Conv}

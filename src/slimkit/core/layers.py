"""Small building blocks the families share: argument normalization, conv + BN (+ activation) units,
and the Pareto front of measured points."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn


def pair(v) -> tuple[int, int]:
    """A 2-D size from an int or a pair (kernel size, stride, padding, dilation)."""
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: Callable[[], nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    """Conv (same padding, no bias) + BatchNorm (+ `act()`): the unit of the zoo's and NAS's mobile nets."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def pareto_front(points: list[dict[str, Any]], *, maximize: tuple[str, ...] = (),
                 minimize: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The points no other point dominates: at least as good on every objective (`maximize` keys higher,
    `minimize` keys lower) and better on one. Order kept; equal points all stay."""
    def key(p):
        return tuple(p[k] for k in maximize) + tuple(-p[k] for k in minimize)

    def dominates(q, p):
        kq, kp = key(q), key(p)
        return all(a >= b for a, b in zip(kq, kp)) and kq != kp

    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]

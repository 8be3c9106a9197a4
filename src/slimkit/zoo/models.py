"""Small reference networks for 1- or 3-channel images (digits, MNIST, CIFAR-sized data).

Every builder takes `num_classes`, `in_channels`, `input_size` and a `width` multiplier (for
distillation students and NAS baselines) and records its source for `slimkit.load`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from slimkit.core.layers import conv_bn
from slimkit.core.state import set_source
from slimkit.errors import ModelError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    builder: Callable[..., nn.Module]
    summary: str
    kind: str = "image"  # "image" | "text"
    extra: str | None = None  # pip extra that provides its weights


ZOO: dict[str, ZooEntry] = {}


def zoo_model(name: str, summary: str, kind: str = "image", extra: str | None = None):
    def deco(fn):
        def build_and_record(**kwargs: Any) -> nn.Module:
            model = fn(**kwargs)
            return set_source(model, "zoo", name, kwargs)

        build_and_record.__name__ = fn.__name__
        build_and_record.__doc__ = fn.__doc__
        ZOO[name] = ZooEntry(name, build_and_record, summary, kind, extra)
        return build_and_record

    return deco


def build(name: str, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build zoo model `name` with keyword arguments (e.g. num_classes=10). With `seed`, the random
    initialization is that seed's (the global RNG is left as it was); without, it draws from the
    global RNG like any torch module."""
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    try:
        if seed is None:
            return ZOO[name].builder(**kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ZOO[name].builder(**kwargs)
    except TypeError as err:
        raise ModelError(f"zoo model {name!r}: {err}") from None


def for_task(name: str, task, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build zoo model `name` shaped for `task` (classes, channels, input size); `seed` as in `build`."""
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    if ZOO[name].kind == "image":
        shape = tuple(task.input_shape)
        if len(shape) == 3:
            kwargs.setdefault("in_channels", shape[0])
            kwargs.setdefault("input_size", shape[-1])
        elif len(shape) == 1 and name == "lenet300_100":
            kwargs.setdefault("in_channels", 1)
            kwargs.setdefault("input_size", int(math.isqrt(shape[0])))
        else:
            raise ModelError(f"zoo model {name!r} expects images (C, H, W); data {task.name!r} has shape {shape}")
        if task.num_classes is not None:
            kwargs.setdefault("num_classes", task.num_classes)
    return build(name, seed=seed, **kwargs)


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


@zoo_model("lenet300_100", "LeNet-300-100: MLP with 300 and 100 hidden units (LeCun et al. 1998)")
def lenet300_100(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0,
                 input_pool: int = 1) -> nn.Module:
    """LeNet-300-100 (266 k parameters at 28x28). `input_pool` > 1 first averages the image over
    input_pool x input_pool blocks (a lower input resolution, as in EfficientNet's resolution
    scaling): the first layer shrinks by input_pool squared."""
    if input_pool < 1 or input_size // input_pool < 1:
        raise ModelError(f"lenet300_100: input_pool must be in [1, input_size={input_size}], got {input_pool}")
    side = input_size // input_pool
    h1, h2 = _ch(300, width), _ch(100, width)
    layers = [nn.AvgPool2d(input_pool)] if input_pool > 1 else []
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(in_channels * side * side, h1), nn.ReLU(),
        nn.Linear(h1, h2), nn.ReLU(),
        nn.Linear(h2, num_classes),
    )


class LeNet5(nn.Module):
    """LeNet-5 (61.7 k parameters at 28x28): conv5x5(6) - pool - conv5x5(16) - pool - 120 - 84."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0):
        super().__init__()
        c1, c2 = _ch(6, width), _ch(16, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((input_size // 2) - 4) // 2
        if side < 1:
            raise ModelError(f"lenet5 needs input_size >= 12, got {input_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, _ch(120, width)), nn.ReLU(),
            nn.Linear(_ch(120, width), _ch(84, width)), nn.ReLU(),
            nn.Linear(_ch(84, width), num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@zoo_model("lenet5", "LeNet-5 convolutional network (LeCun et al. 1998)")
def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0) -> nn.Module:
    return LeNet5(num_classes, in_channels, input_size, width)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """ReLU6 after depthwise and pointwise convolutions (MobileNet), ReLU after full ones."""
    return conv_bn(cin, cout, k, stride, groups, (nn.ReLU6 if groups > 1 or k == 1 else nn.ReLU) if act else None)


class VGGSmall(nn.Module):
    """VGG-style CNN: three stages of two 3x3 conv-BN-ReLU, max-pool after each, then a classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0,
                 channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for c in channels:
            c = _ch(c, width)
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.MaxPool2d(2)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@zoo_model("vgg_small", "VGG-style CNN, 3 stages of 2 conv3x3-BN-ReLU (32/64/128 channels)")
def vgg_small(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0) -> nn.Module:
    return VGGSmall(num_classes, in_channels, input_size, width)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-14-style network for small images: stem + 3 stages x 2 basic blocks (16/32/64 channels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0,
                 channels: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 2):
        super().__init__()
        c0 = _ch(channels[0], width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        stages = []
        cin = c0
        for i, c in enumerate(channels):
            c = _ch(c, width)
            blocks = [BasicBlock(cin, c, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(c, c) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@zoo_model("resnet_small", "small ResNet: 3 stages x 2 basic blocks (16/32/64 channels)")
def resnet_small(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0) -> nn.Module:
    return ResNetSmall(num_classes, in_channels, input_size, width)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand - kxk depthwise - 1x1 project (linear), residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: int = 6, kernel_size: int = 3):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [_conv_bn(hidden, hidden, kernel_size, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style network for small images."""

    # (expansion, channels, repeats, stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0,
                 last_channels: int = 128):
        super().__init__()
        c0 = _ch(16, width)
        layers: list[nn.Module] = [_conv_bn(in_channels, c0, 3, 1)]
        cin = c0
        for t, c, n, s in self.SETTINGS:
            c = _ch(c, width)
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        last = _ch(last_channels, width)
        layers.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@zoo_model("mobilenetv2_small", "small MobileNetV2-style net (inverted residuals, depthwise 3x3)")
def mobilenetv2_small(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: float = 1.0) -> nn.Module:
    return MobileNetV2Small(num_classes, in_channels, input_size, width)

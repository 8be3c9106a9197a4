"""NAS search spaces: a MobileNetV2/EfficientNet-style space and a small cell-based CNN space.

A space is a list of categorical `Decision`s. A point in it (`choices`: decision name -> value) maps
to an architecture *spec* (a JSON dict), and `build(spec)` turns a spec into an `nn.Module`. Saved
models rebuild from the spec alone (`slimkit.core.state.set_source(model, "factory",
"slimkit.search.space:build", {"spec": spec})`), so `slimkit.load` needs no user code.

    space = MBConvSpace.for_task(task)
    choices = space.cheapest()
    model = build(space.spec(choices))

Every network is a `SearchNet`: a plain chain of *units* (stem, blocks or cells, head). Each unit
carries a `key` naming its operator and input shape, which the latency lookup table is keyed by.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from slimkit.core.layers import conv_bn
from slimkit.core.artifact import register_builder
from slimkit.core.config import Config
from slimkit.core.state import set_source
from slimkit.errors import ConfigError, ModelError

FACTORY = "slimkit.search.space:build"


@dataclass(frozen=True)
class Decision:
    """One categorical choice of a space: its name and the values it may take (JSON primitives)."""

    name: str
    choices: tuple


def _round_channels(c: float) -> int:
    # multiples of 4 keep depthwise/SE shapes tidy; never below 4 channels
    return max(4, int(round(c / 4)) * 4)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    return conv_bn(cin, cout, k, stride, groups, nn.ReLU6 if act else None)


def _out_size(size: int, stride: int) -> int:
    return (size + stride - 1) // stride  # 'same' padding with odd kernels


# ---------------------------------------------------------------------------------------------
# units
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates from global context (EfficientNet uses it in MBConv)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand - kxk depthwise - (SE) - 1x1 linear project (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expansion: int, se: bool):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, kernel, stride, groups=hidden))
        if se:
            layers.append(SqueezeExcite(hidden, max(4, cin // 4)))
        layers.append(_conv_bn(hidden, cout, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class Head(nn.Module):
    """1x1 conv to `last` channels, global average pool, linear classifier."""

    def __init__(self, cin: int, last: int, num_classes: int):
        super().__init__()
        self.conv = _conv_bn(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.conv(x)), 1))


CELL_OPS = ("identity", "conv3x3", "conv5x5", "sep3x3", "sep5x5", "maxpool3x3", "avgpool3x3")
# cheapest first: used to find the cheapest candidate of a cell space
_CELL_OP_COST = {"identity": 0, "maxpool3x3": 1, "avgpool3x3": 1, "sep3x3": 2, "sep5x5": 3, "conv3x3": 4, "conv5x5": 5}


def cell_op(name: str, channels: int) -> nn.Module:
    """A channel- and size-preserving operation of the cell space."""
    c = channels
    if name == "identity":
        return nn.Identity()
    if name in ("conv3x3", "conv5x5"):
        k = int(name[-1])
        return _conv_bn(c, c, k)
    if name in ("sep3x3", "sep5x5"):
        k = int(name[-1])
        return nn.Sequential(nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False), _conv_bn(c, c, 1))
    if name == "maxpool3x3":
        return nn.MaxPool2d(3, 1, 1)
    if name == "avgpool3x3":
        return nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    raise ConfigError(f"unknown cell operation {name!r}; known: {', '.join(CELL_OPS)}")


class Cell(nn.Module):
    """A NASNet-style cell: node i applies `op_i` to one earlier tensor (the cell input is tensor 0);
    the cell output is the sum of the nodes no other node consumes (the 'loose ends')."""

    def __init__(self, channels: int, nodes: list[dict[str, Any]]):
        super().__init__()
        self.inputs = [int(n["input"]) for n in nodes]
        self.ops = nn.ModuleList(cell_op(n["op"], channels) for n in nodes)
        used = set(self.inputs)
        self.outputs = [i + 1 for i in range(len(nodes)) if (i + 1) not in used]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = [x]
        for op, src in zip(self.ops, self.inputs):
            states.append(op(states[src]))
        out = states[self.outputs[0]]
        for i in self.outputs[1:]:
            out = out + states[i]
        return out


class SearchNet(nn.Module):
    """A chain of units built from a spec. `unit_keys[i]` / `unit_shapes[i]` name unit i's operator
    and its input shape (without batch) for the latency lookup table."""

    def __init__(self, units: list[tuple[str, nn.Module, tuple[int, ...]]], spec: dict[str, Any]):
        super().__init__()
        self.units = nn.ModuleList(u for _, u, _ in units)
        self.unit_keys = [k for k, _, _ in units]
        self.unit_shapes = [s for _, _, s in units]
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


def _key(kind: str, shape: tuple[int, ...], **args: Any) -> str:
    return json.dumps({"op": kind, "in": list(shape), **args}, sort_keys=True)


def mbconv_unit(cin: int, cout: int, stride: int, kernel: int, expansion: int, se: bool, size: int):
    """(key, module, input shape) of one MBConv block at spatial `size`."""
    shape = (cin, size, size)
    key = _key("mbconv", shape, cout=cout, stride=stride, kernel=kernel, expansion=expansion, se=se)
    return key, MBConv(cin, cout, stride, kernel, expansion, se), shape


def build(spec: dict[str, Any]) -> nn.Module:
    """Build the `nn.Module` an architecture spec describes (the factory `slimkit.load` calls)."""
    if not isinstance(spec, dict) or "space" not in spec:
        raise ModelError("an architecture spec must be a dict with a 'space' key (mbconv or cell)")
    try:
        if spec["space"] == "mbconv":
            model = _build_mbconv(spec)
        elif spec["space"] == "cell":
            model = _build_cell(spec)
        else:
            raise ModelError(f"unknown search space {spec['space']!r} in spec; use 'mbconv' or 'cell'")
    except (KeyError, TypeError) as err:
        raise ModelError(f"malformed {spec.get('space')} architecture spec: missing or bad field {err}") from None
    return set_source(model, "factory", FACTORY, {"spec": spec})


register_builder(build, name=FACTORY)  # slimkit's own: `load` rebuilds searched architectures without asking


def _build_mbconv(spec: dict[str, Any]) -> SearchNet:
    size, cin = int(spec["input_size"]), int(spec["in_channels"])
    stem = int(spec["stem_channels"])
    units = [(_key("stem", (cin, size, size), cout=stem), _conv_bn(cin, stem, 3, 1), (cin, size, size))]
    cin = stem
    for stage in spec["stages"]:
        for i in range(int(stage["depth"])):
            stride = int(stage["stride"]) if i == 0 else 1
            units.append(mbconv_unit(cin, int(stage["channels"]), stride, int(stage["kernel"]),
                                     int(stage["expansion"]), bool(stage["se"]), size))
            size = _out_size(size, stride)
            cin = int(stage["channels"])
    last, classes = int(spec["last_channels"]), int(spec["num_classes"])
    units.append((_key("head", (cin, size, size), last=last, classes=classes), Head(cin, last, classes), (cin, size, size)))
    return SearchNet(units, spec)


def _build_cell(spec: dict[str, Any]) -> SearchNet:
    size, cin = int(spec["input_size"]), int(spec["in_channels"])
    nodes = spec["cell"]
    genotype = [[n["op"], int(n["input"])] for n in nodes]
    stem = int(spec["stem_channels"])
    units = [(_key("stem", (cin, size, size), cout=stem), _conv_bn(cin, stem, 3, 1), (cin, size, size))]
    cin = stem
    for s, stage in enumerate(spec["stages"]):
        c = int(stage["channels"])
        if s > 0 or c != cin:  # fixed (not searched) reduction between stages, as in NASNet
            stride = 2 if s > 0 else 1
            shape = (cin, size, size)
            units.append((_key("reduce", shape, cout=c, stride=stride), _conv_bn(cin, c, 3, stride), shape))
            size = _out_size(size, stride)
            cin = c
        for _ in range(int(spec["cells_per_stage"])):
            shape = (c, size, size)
            units.append((_key("cell", shape, genotype=genotype), Cell(c, nodes), shape))
    last, classes = int(spec["last_channels"]), int(spec["num_classes"])
    units.append((_key("head", (cin, size, size), last=last, classes=classes), Head(cin, last, classes), (cin, size, size)))
    return SearchNet(units, spec)


# ---------------------------------------------------------------------------------------------
# spaces
class _TaskShape(Config):
    num_classes: int = Field(10, ge=2)
    in_channels: int = Field(1, ge=1)
    input_size: int = Field(28, ge=1)


class MBConvSpace(_TaskShape):
    """MobileNetV2/EfficientNet-style space: a global width multiplier and, per stage, depth, kernel
    size, expansion ratio and squeeze-excitation on/off. Stage channels and strides are fixed.

    The defaults contain the zoo's `mobilenetv2_small` (width 1, depths 1/2/2/2, kernel 3,
    expansions 1/6/6/6, no SE), so a search can be compared with it like for like.
    """

    kind: Literal["mbconv"] = "mbconv"
    stage_channels: list[int] = Field(default_factory=lambda: [16, 24, 32, 64])
    stage_strides: list[int] = Field(default_factory=lambda: [1, 2, 2, 1])
    stem_channels: int = Field(16, ge=1)
    last_channels: int = Field(128, ge=1)
    widths: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0])
    depths: list[int] = Field(default_factory=lambda: [1, 2, 3])
    kernels: list[int] = Field(default_factory=lambda: [3, 5, 7])
    expansions: list[int] = Field(default_factory=lambda: [1, 3, 6])
    se: list[bool] = Field(default_factory=lambda: [False, True])

    @model_validator(mode="after")
    def _check(self) -> "MBConvSpace":
        for name in ("stage_channels", "widths", "depths", "kernels", "expansions", "se"):
            if not getattr(self, name):
                raise ValueError(f"'{name}' is empty: the space has no candidate (give at least one value)")
        if len(self.stage_strides) != len(self.stage_channels):
            raise ValueError(f"'stage_strides' has {len(self.stage_strides)} entries but 'stage_channels' has "
                             f"{len(self.stage_channels)}: give one stride per stage")
        if any(s not in (1, 2) for s in self.stage_strides):
            raise ValueError(f"'stage_strides' must be 1 or 2, got {self.stage_strides}")
        if any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError(f"'kernels' must be odd and positive ('same' padding), got {self.kernels}")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"'depths' must be >= 1, got {self.depths}")
        if any(e < 1 for e in self.expansions):
            raise ValueError(f"'expansions' must be >= 1, got {self.expansions}")
        if any(w <= 0 for w in self.widths):
            raise ValueError(f"'widths' must be > 0, got {self.widths}")
        size = self.input_size
        for s in self.stage_strides:
            size = _out_size(size, s)
        if size < 1 or self.input_size < 2 ** sum(s == 2 for s in self.stage_strides):
            raise ValueError(f"{sum(s == 2 for s in self.stage_strides)} stride-2 stages need inputs of at least "
                             f"{2 ** sum(s == 2 for s in self.stage_strides)} pixels, but input_size is {self.input_size}")
        for name in ("widths", "depths", "kernels", "expansions", "se"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"'{name}' lists a value twice: {values}")
        return self

    @classmethod
    def for_task(cls, task, **options: Any) -> "MBConvSpace":
        """The space shaped for `task` (classes, channels, input size); `options` override fields."""
        return cls(**{**_task_shape(task), **options})

    def decisions(self) -> list[Decision]:
        out = [Decision("width", tuple(self.widths))]
        for s in range(len(self.stage_channels)):
            out += [Decision(f"s{s}.depth", tuple(self.depths)), Decision(f"s{s}.kernel", tuple(self.kernels)),
                    Decision(f"s{s}.expansion", tuple(self.expansions)), Decision(f"s{s}.se", tuple(self.se))]
        return out

    def spec(self, choices: dict[str, Any]) -> dict[str, Any]:
        _check_choices(self, choices)
        w = float(choices["width"])
        stages = [{"channels": _round_channels(c * w), "stride": st, "depth": int(choices[f"s{s}.depth"]),
                   "kernel": int(choices[f"s{s}.kernel"]), "expansion": int(choices[f"s{s}.expansion"]),
                   "se": bool(choices[f"s{s}.se"])}
                  for s, (c, st) in enumerate(zip(self.stage_channels, self.stage_strides))]
        return {"space": "mbconv", "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": self.input_size, "width": w, "stem_channels": _round_channels(self.stem_channels * w),
                "last_channels": _round_channels(self.last_channels * w), "stages": stages}

    def cheapest(self) -> dict[str, Any]:
        """The choices with the fewest MACs, parameters and latency (every cost is monotone in each)."""
        c = {"width": min(self.widths)}
        for s in range(len(self.stage_channels)):
            c.update({f"s{s}.depth": min(self.depths), f"s{s}.kernel": min(self.kernels),
                      f"s{s}.expansion": min(self.expansions), f"s{s}.se": False if False in self.se else True})
        return c


class CellSpace(_TaskShape):
    """Small cell-based CNN space (NASNet/DARTS-style): one searched cell of `nodes` nodes (each node
    an operation applied to an earlier node or the cell input), repeated `cells_per_stage` times in
    each stage, with fixed stride-2 reductions between stages."""

    kind: Literal["cell"] = "cell"
    nodes: int = Field(3, ge=1, le=8)
    ops: list[str] = Field(default_factory=lambda: list(CELL_OPS))
    stage_channels: list[int] = Field(default_factory=lambda: [16, 32, 64])
    stem_channels: int = Field(16, ge=1)
    last_channels: int = Field(128, ge=1)
    cells_per_stage: list[int] = Field(default_factory=lambda: [1, 2])
    widths: list[float] = Field(default_factory=lambda: [0.5, 1.0])

    @model_validator(mode="after")
    def _check(self) -> "CellSpace":
        for name in ("ops", "stage_channels", "cells_per_stage", "widths"):
            if not getattr(self, name):
                raise ValueError(f"'{name}' is empty: the space has no candidate (give at least one value)")
        unknown = [o for o in self.ops if o not in CELL_OPS]
        if unknown:
            raise ValueError(f"unknown cell operations {unknown}; known: {', '.join(CELL_OPS)}")
        if any(c < 1 for c in self.cells_per_stage):
            raise ValueError(f"'cells_per_stage' must be >= 1, got {self.cells_per_stage}")
        if any(w <= 0 for w in self.widths):
            raise ValueError(f"'widths' must be > 0, got {self.widths}")
        if self.input_size < 2 ** (len(self.stage_channels) - 1):
            raise ValueError(f"{len(self.stage_channels) - 1} reductions need inputs of at least "
                             f"{2 ** (len(self.stage_channels) - 1)} pixels, but input_size is {self.input_size}")
        return self

    @classmethod
    def for_task(cls, task, **options: Any) -> "CellSpace":
        return cls(**{**_task_shape(task), **options})

    def decisions(self) -> list[Decision]:
        out = [Decision("width", tuple(self.widths)), Decision("cells_per_stage", tuple(self.cells_per_stage))]
        for i in range(self.nodes):
            out += [Decision(f"n{i}.op", tuple(self.ops)), Decision(f"n{i}.input", tuple(range(i + 1)))]
        return out

    def spec(self, choices: dict[str, Any]) -> dict[str, Any]:
        _check_choices(self, choices)
        w = float(choices["width"])
        return {"space": "cell", "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": self.input_size, "width": w, "stem_channels": _round_channels(self.stem_channels * w),
                "last_channels": _round_channels(self.last_channels * w),
                "cells_per_stage": int(choices["cells_per_stage"]),
                "stages": [{"channels": _round_channels(c * w)} for c in self.stage_channels],
                "cell": [{"op": choices[f"n{i}.op"], "input": int(choices[f"n{i}.input"])} for i in range(self.nodes)]}

    def cheapest(self) -> dict[str, Any]:
        op = min(self.ops, key=_CELL_OP_COST.__getitem__)
        c = {"width": min(self.widths), "cells_per_stage": min(self.cells_per_stage)}
        for i in range(self.nodes):
            c.update({f"n{i}.op": op, f"n{i}.input": 0})
        return c


Space = MBConvSpace | CellSpace
SPACES = {"mbconv": MBConvSpace, "cell": CellSpace}


def make_space(kind: str, task=None, **options: Any) -> Space:
    """Build the space named `kind` ('mbconv' or 'cell'), shaped for `task` when given."""
    if kind not in SPACES:
        raise ConfigError(f"unknown search space {kind!r}; use one of: {', '.join(SPACES)}")
    cls = SPACES[kind]
    return cls.for_task(task, **options) if task is not None else cls(**options)


def _task_shape(task) -> dict[str, int]:
    shape = tuple(task.input_shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"NAS spaces need square images (C, H, H); data {task.name!r} has shape {shape}")
    if task.num_classes is None:
        raise ConfigError(f"NAS needs a classification task; data {task.name!r} has no num_classes")
    return {"num_classes": int(task.num_classes), "in_channels": int(shape[0]), "input_size": int(shape[1])}


def _check_choices(space: Space, choices: dict[str, Any]) -> None:
    for d in space.decisions():
        if d.name not in choices:
            raise ConfigError(f"{space.kind} space: no value for decision {d.name!r}")
        if choices[d.name] not in d.choices:
            raise ConfigError(f"{space.kind} space: {d.name}={choices[d.name]!r} is not one of {list(d.choices)}")


def space_size(space: Space) -> int:
    """Number of distinct points (choice combinations) in the space."""
    n = 1
    for d in space.decisions():
        n *= len(d.choices)
    return n


def all_choices(space: Space):
    """Iterate over every point of a (small) space; for tests and exhaustive checks."""
    decisions = space.decisions()
    for values in product(*(d.choices for d in decisions)):
        yield dict(zip((d.name for d in decisions), values))


def mobilenetv2_small_choices(space: MBConvSpace) -> dict[str, Any]:
    """The choices that reproduce the zoo's `mobilenetv2_small` in the default MBConv space."""
    choices = {"width": 1.0}
    for s, (depth, expansion) in enumerate(((1, 1), (2, 6), (2, 6), (2, 6))):
        choices.update({f"s{s}.depth": depth, f"s{s}.kernel": 3, f"s{s}.expansion": expansion, f"s{s}.se": False})
    _check_choices(space, choices)
    return choices

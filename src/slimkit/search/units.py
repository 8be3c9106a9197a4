"""The units NAS networks are made of (stem, MBConv blocks, cells, head) and `build(spec)`, which turns an
architecture spec into a `SearchNet`: a plain chain of units, each with a `key` naming its operator and input
shape (the latency table's key). Registered as a trusted builder under the name saved files use."""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.artifact import register_builder
from slimkit.core.layers import conv_bn
from slimkit.core.state import set_source
from slimkit.errors import ConfigError, ModelError

FACTORY = "slimkit.search.space:build"  # the name in saved files (`space` re-exports `build`)


def round_channels(c: float) -> int:
    # multiples of 4 keep depthwise/SE shapes tidy; never below 4 channels
    return max(4, int(round(c / 4)) * 4)


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    return conv_bn(cin, cout, k, stride, groups, nn.ReLU6 if act else None)


def out_size(size: int, stride: int) -> int:
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
            layers.append(conv_bn_act(cin, hidden, 1))
        layers.append(conv_bn_act(hidden, hidden, kernel, stride, groups=hidden))
        if se:
            layers.append(SqueezeExcite(hidden, max(4, cin // 4)))
        layers.append(conv_bn_act(hidden, cout, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class Head(nn.Module):
    """1x1 conv to `last` channels, global average pool, linear classifier."""

    def __init__(self, cin: int, last: int, num_classes: int):
        super().__init__()
        self.conv = conv_bn_act(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.conv(x)), 1))


CELL_OPS = ("identity", "conv3x3", "conv5x5", "sep3x3", "sep5x5", "maxpool3x3", "avgpool3x3")


# cheapest first: used to find the cheapest candidate of a cell space
CELL_OP_COST = {"identity": 0, "maxpool3x3": 1, "avgpool3x3": 1, "sep3x3": 2, "sep5x5": 3, "conv3x3": 4, "conv5x5": 5}


def cell_op(name: str, channels: int) -> nn.Module:
    """A channel- and size-preserving operation of the cell space."""
    c = channels
    if name == "identity":
        return nn.Identity()
    if name in ("conv3x3", "conv5x5"):
        k = int(name[-1])
        return conv_bn_act(c, c, k)
    if name in ("sep3x3", "sep5x5"):
        k = int(name[-1])
        return nn.Sequential(nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False), conv_bn_act(c, c, 1))
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


def unit_key(kind: str, shape: tuple[int, ...], **args: Any) -> str:
    return json.dumps({"op": kind, "in": list(shape), **args}, sort_keys=True)


def mbconv_unit(cin: int, cout: int, stride: int, kernel: int, expansion: int, se: bool, size: int):
    """(key, module, input shape) of one MBConv block at spatial `size`."""
    shape = (cin, size, size)
    key = unit_key("mbconv", shape, cout=cout, stride=stride, kernel=kernel, expansion=expansion, se=se)
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


def _build_mbconv(spec: dict[str, Any]) -> SearchNet:
    size, cin = int(spec["input_size"]), int(spec["in_channels"])
    stem = int(spec["stem_channels"])
    units = [(unit_key("stem", (cin, size, size), cout=stem), conv_bn_act(cin, stem, 3, 1), (cin, size, size))]
    cin = stem
    for stage in spec["stages"]:
        for i in range(int(stage["depth"])):
            stride = int(stage["stride"]) if i == 0 else 1
            units.append(mbconv_unit(cin, int(stage["channels"]), stride, int(stage["kernel"]),
                                     int(stage["expansion"]), bool(stage["se"]), size))
            size = out_size(size, stride)
            cin = int(stage["channels"])
    last, classes = int(spec["last_channels"]), int(spec["num_classes"])
    units.append((unit_key("head", (cin, size, size), last=last, classes=classes), Head(cin, last, classes), (cin, size, size)))
    return SearchNet(units, spec)


def _build_cell(spec: dict[str, Any]) -> SearchNet:
    size, cin = int(spec["input_size"]), int(spec["in_channels"])
    nodes = spec["cell"]
    genotype = [[n["op"], int(n["input"])] for n in nodes]
    stem = int(spec["stem_channels"])
    units = [(unit_key("stem", (cin, size, size), cout=stem), conv_bn_act(cin, stem, 3, 1), (cin, size, size))]
    cin = stem
    for s, stage in enumerate(spec["stages"]):
        c = int(stage["channels"])
        if s > 0 or c != cin:  # fixed (not searched) reduction between stages, as in NASNet
            stride = 2 if s > 0 else 1
            shape = (cin, size, size)
            units.append((unit_key("reduce", shape, cout=c, stride=stride), conv_bn_act(cin, c, 3, stride), shape))
            size = out_size(size, stride)
            cin = c
        for _ in range(int(spec["cells_per_stage"])):
            shape = (c, size, size)
            units.append((unit_key("cell", shape, genotype=genotype), Cell(c, nodes), shape))
    last, classes = int(spec["last_channels"]), int(spec["num_classes"])
    units.append((unit_key("head", (cin, size, size), last=last, classes=classes), Head(cin, last, classes), (cin, size, size)))
    return SearchNet(units, spec)


register_builder(build, name=FACTORY)  # slimkit's own: `load` rebuilds searched architectures without asking

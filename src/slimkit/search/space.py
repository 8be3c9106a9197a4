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

from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

from pydantic import Field, model_validator

from slimkit.core.config import Config
from slimkit.errors import ConfigError
from slimkit.search.units import (CELL_OP_COST, CELL_OPS, FACTORY, Cell, Head, MBConv, SearchNet, SqueezeExcite, build,  # noqa: F401
                                  cell_op, mbconv_unit, out_size, round_channels)


@dataclass(frozen=True)
class Decision:
    """One categorical choice of a space: its name and the values it may take (JSON primitives)."""

    name: str
    choices: tuple


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
            size = out_size(size, s)
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
        stages = [{"channels": round_channels(c * w), "stride": st, "depth": int(choices[f"s{s}.depth"]),
                   "kernel": int(choices[f"s{s}.kernel"]), "expansion": int(choices[f"s{s}.expansion"]),
                   "se": bool(choices[f"s{s}.se"])}
                  for s, (c, st) in enumerate(zip(self.stage_channels, self.stage_strides))]
        return {"space": "mbconv", "num_classes": self.num_classes, "in_channels": self.in_channels,
                "input_size": self.input_size, "width": w, "stem_channels": round_channels(self.stem_channels * w),
                "last_channels": round_channels(self.last_channels * w), "stages": stages}

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
                "input_size": self.input_size, "width": w, "stem_channels": round_channels(self.stem_channels * w),
                "last_channels": round_channels(self.last_channels * w),
                "cells_per_stage": int(choices["cells_per_stage"]),
                "stages": [{"channels": round_channels(c * w)} for c in self.stage_channels],
                "cell": [{"op": choices[f"n{i}.op"], "input": int(choices[f"n{i}.input"])} for i in range(self.nodes)]}

    def cheapest(self) -> dict[str, Any]:
        op = min(self.ops, key=CELL_OP_COST.__getitem__)
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

"""Wiring for feature distillation: layer-pattern resolution, forward-hook capture, adapters.

Adapters (FitNets "regressors") exist only during training: they map a student feature to the
teacher's feature shape and are discarded afterwards, so the distilled student keeps its own
architecture.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.errors import ConfigError, SelectorError, UnsupportedLayerError


def match_layers(model: nn.Module, pattern: str, *, role: str) -> list[str]:
    """Names of the modules of `model` matching fnmatch `pattern`, in model order.

    Raises SelectorError naming the pattern (and the model's top-level layers) when nothing matches.
    """
    names = [name for name, _ in model.named_modules() if name]
    matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        what = "layer" if not any(ch in pattern for ch in "*?[") else "pattern"
        raise SelectorError(f"feature distillation: {role} {what} {pattern!r} does not exist in "
                            f"{type(model).__name__} (its layers: {shown or 'none'}); "
                            "check the names with `slimkit list --layers`")
    return matched


def resolve_links(student: nn.Module, teacher: nn.Module, links) -> list[tuple[str, str, object]]:
    """Pair student and teacher layers for every `FeatureLink`: [(student_name, teacher_name, link)]."""
    pairs = []
    for link in links:
        s_names = match_layers(student, link.student, role="student")
        t_names = match_layers(teacher, link.teacher, role="teacher")
        if len(s_names) != len(t_names):
            raise SelectorError(
                f"feature distillation: student pattern {link.student!r} matches {len(s_names)} layers "
                f"({', '.join(s_names[:6])}) but teacher pattern {link.teacher!r} matches {len(t_names)} "
                f"({', '.join(t_names[:6])}); the patterns must pair layers one to one")
        pairs += [(s, t, link) for s, t in zip(s_names, t_names)]
    return pairs


class FeatureCapture:
    """Records the outputs of named layers on every forward pass (forward hooks).

        with FeatureCapture(model, ["features.3"]) as cap:
            model(x); cap.outputs["features.3"]
    """

    def __init__(self, model: nn.Module, names: list[str], *, detach: bool = False):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(names):  # unique, in order
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name, detach)))

    def _hook(self, name: str, detach: bool):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise UnsupportedLayerError(f"feature distillation: layer {name!r} ({type(module).__name__}) "
                                            f"returns {type(output).__name__}, not a tensor")
            self.outputs[name] = output.detach() if detach else output
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class HintAdapter(nn.Module):
    """Maps a student feature onto the teacher's feature shape: a 1x1 conv (plus spatial resize) for
    conv maps, a linear layer on the last dimension otherwise. Trained with the student."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        self.conv = len(teacher_shape) == 4
        self.size = tuple(teacher_shape[-2:]) if self.conv else None
        if self.conv:
            self.proj = nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)
        else:
            self.proj = nn.Linear(student_shape[-1], teacher_shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return _resize(self.proj(x), self.size)
        return self.proj(x)


def make_adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, student_name: str,
                 teacher_name: str) -> nn.Module:
    """Identity when the shapes already agree, else a `HintAdapter`; ConfigError when no 1x1/linear
    map can relate the two shapes."""
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    if len(student_shape) == len(teacher_shape) == 4:
        return HintAdapter(student_shape, teacher_shape)
    if len(student_shape) == len(teacher_shape) >= 2 and student_shape[:-1] == teacher_shape[:-1]:
        return HintAdapter(student_shape, teacher_shape)
    raise ConfigError(f"feature distillation: student layer {student_name!r} outputs shape {tuple(student_shape)}, "
                      f"teacher layer {teacher_name!r} outputs {tuple(teacher_shape)}; a hint needs both to be conv "
                      "maps (N, C, H, W) or to differ only in the last dimension")


def check_attention_shapes(student_shape, teacher_shape, *, student_name: str, teacher_name: str) -> None:
    """Attention transfer compares spatial maps, so both features must be 4-D conv maps."""
    for name, shape, role in ((student_name, student_shape, "student"), (teacher_name, teacher_shape, "teacher")):
        if len(shape) != 4:
            raise ConfigError(f"attention transfer needs conv feature maps (N, C, H, W); {role} layer {name!r} "
                              f"outputs shape {tuple(shape)}; use kind='hint' for it")

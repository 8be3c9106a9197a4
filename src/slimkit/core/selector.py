"""Module selection shared by all techniques: include/exclude name patterns and layer types.

A selector that matches nothing raises `SelectorError`: a silent no-op would produce a
"compressed" model that was not compressed. Layers inside a technique's wrapper (a module whose class
sets `slimkit_wrapper = True`, e.g. a quantized layer holding its float original) are never selected.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch.nn as nn
from pydantic import Field

from slimkit.core.config import Config
from slimkit.errors import SelectorError


class Selector(Config):
    """Which modules a technique touches.

    include: fnmatch patterns on module names (`"features.*"`, `"fc1"`); default all.
    exclude: patterns removed after include.
    types: layer class names (`"Linear"`, `"Conv2d"`); empty means the technique's defaults.
    """

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list)


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def select(
    model: nn.Module,
    selector: Selector | None = None,
    *,
    default_types: Iterable[type[nn.Module]] = (nn.Linear, nn.Conv2d),
    what: str = "technique",
) -> list[tuple[str, nn.Module]]:
    """Return `(name, module)` pairs the selector matches, in model order; raise if none."""
    selector = selector or Selector()
    default_types = tuple(default_types)
    wanted_types = set(selector.types)
    matched, wrappers = [], []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name.startswith(w + ".") for w in wrappers):
            continue  # inside a technique's wrapper (a quantized layer's float original): never re-selected
        if getattr(module, "slimkit_wrapper", False):
            wrappers.append(name)
        if wanted_types:
            if not (_type_names(module) & wanted_types):
                continue
        elif not isinstance(module, default_types):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in selector.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in selector.exclude):
            continue
        matched.append((name, module))
    if not matched:
        types = sorted(wanted_types) or [t.__name__ for t in default_types]
        raise SelectorError(
            f"{what}: selector include={selector.include} exclude={selector.exclude} types={types} "
            f"matched no layer of {type(model).__name__}; check the layer names with `slimkit list --layers`"
        )
    # A pattern naming an exact layer that does not exist is a typo, not a wildcard.
    names = {n for n, _ in model.named_modules()}
    for pattern in selector.include:
        if not any(ch in pattern for ch in "*?[") and pattern not in names:
            raise SelectorError(f"{what}: layer {pattern!r} does not exist in {type(model).__name__}")
    return matched


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SelectorError(f"layer {name!r} does not exist in {type(model).__name__}") from None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    setattr(parent, child, new)

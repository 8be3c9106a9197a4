"""The technique registry.

Each technique registers itself from its own folder (`slimkit/<family>/apply.py` calls
`register(...)` at import). `load_all()` imports every `slimkit.<pkg>.apply` module it finds, and
plugin packages outside slimkit (entry point group `slimkit.techniques`, or SLIMKIT_PLUGINS), so
adding a technique touches nothing central. The CLI, the demo, recipes, the advisor's search space
and the HTML report's sections all come from here.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from slimkit.core.state import REPORT_ATTRS, applied
from slimkit.errors import ConfigError

if TYPE_CHECKING:
    import torch.nn as nn

    from slimkit.core.config import Config
    from slimkit.core.task import Task


@dataclass(frozen=True)
class Technique:
    """One registered technique.

    apply(model, config, task=None, **kw) -> new model (the input is never mutated).
    restore(model, config, structure) -> model with the structure the technique produced,
        weights not yet loaded; used by `slimkit.load` to rebuild a saved model. None when the
        technique does not change module structure (only weight values).
    demo(model, task) -> config or None: the config the demo runs (None: not part of the demo).
    write_artifact(model, directory, task) -> path of the deployable file this technique's result is
        measured by (default: slimkit.save's safetensors file).
    runtime: which runtime its result runs on for latency ("torch" or "ort").
    next: the techniques that may follow this one on a model (None: any; (): none, it is final, like
        quantize, whose wrapped layers another technique must not select). Enforced before any work by
        `check_chain`: in every technique's entry point (`@chained`), `apply`, `run_stage`, and `load`.
    sections: what the technique reports beyond notes, and how it is drawn: payload key -> renderer.
        The technique sets `model.slimkit_<key>` (JSON-serializable); `slimkit.save` stores it in the
        stage record, `load` sets it again, `run_stage` copies it into the stage entry, and the HTML
        report calls `renderer(stage_entry) -> html` for every stage that has it.
    candidates(auto) -> {label: recipe config dict}: the points of this technique the advisor may try
        (`auto`: its `AutoConfig`, for the training budgets and seed); `describe(label)` says one in
        words. None: the advisor does not use the technique. Techniques that may be followed by others
        each get a dimension of the search; final ones (`next == ()`) share one, the output format.
    """

    name: str
    family: str
    config_cls: type[Config]
    apply: Callable[..., nn.Module]
    summary: str
    restore: Callable[..., nn.Module] | None = None
    demo: Callable[[nn.Module, Task], Config | None] | None = None
    write_artifact: Callable[..., Any] | None = None
    runtime: str = "torch"
    order: int = 50  # position in the demo (lower runs first)
    next: tuple[str, ...] | None = None
    sections: Mapping[str, Callable[[dict], str]] = field(default_factory=dict)
    candidates: Callable[..., dict[str, dict]] | None = None
    describe: Callable[[str], str] | None = None


_REGISTRY: dict[str, Technique] = {}
_LOADED = False


def register(technique: Technique) -> Technique:
    existing = _REGISTRY.get(technique.name)
    if existing is not None and existing.apply is not technique.apply:
        raise ValueError(f"technique {technique.name!r} registered twice")
    drawn = {key: render for other in _REGISTRY.values() for key, render in other.sections.items()}
    for key, render in technique.sections.items():
        if drawn.get(key, render) is not render:
            raise ValueError(f"report payload {key!r} of technique {technique.name!r} is drawn by another technique")
        REPORT_ATTRS.setdefault(key, f"slimkit_{key}")
    _REGISTRY[technique.name] = technique
    return technique


def report_sections() -> dict[str, Callable[[dict], str]]:
    """Payload key -> renderer, over every registered technique's report sections."""
    return {key: render for t in techniques() for key, render in t.sections.items()}


PLUGINS_ENV = "SLIMKIT_PLUGINS"
ENTRY_POINTS = "slimkit.techniques"


def load_all() -> None:
    """Import every `slimkit.<pkg>.apply` module so all techniques are registered, then the plugins: the
    modules of installed packages' `slimkit.techniques` entry points, and those named (comma-separated)
    in the environment variable SLIMKIT_PLUGINS. A plugin registers its techniques at import exactly as
    slimkit's own families do. Plugins are code the user installed or named; a model file never names one."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # a module that asks the registry while it is being loaded sees what is registered so far
    try:
        import slimkit

        for info in pkgutil.iter_modules(slimkit.__path__):
            if info.ispkg and importlib.util.find_spec(f"slimkit.{info.name}.apply") is not None:
                importlib.import_module(f"slimkit.{info.name}.apply")
        for module in plugin_modules():
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ConfigError(f"slimkit plugin {module!r} (from {PLUGINS_ENV} or a {ENTRY_POINTS!r} entry "
                                  f"point) cannot be imported: {err}") from None
    except BaseException:
        _LOADED = False
        raise


def plugin_modules() -> list[str]:
    """The plugin modules to import: entry points first, then SLIMKIT_PLUGINS, each once."""
    import os
    from importlib.metadata import entry_points

    found = [ep.value.split(":", 1)[0] for ep in entry_points(group=ENTRY_POINTS)]
    found += [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return list(dict.fromkeys(found))


def techniques() -> list[Technique]:
    load_all()
    return sorted(_REGISTRY.values(), key=lambda t: (t.order, t.name))


def get(name: str) -> Technique:
    load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise ConfigError(f"unknown technique {name!r}; known techniques: {known}") from None


def for_config(config: Config) -> Technique:
    load_all()
    for t in _REGISTRY.values():
        if type(config) is t.config_cls:
            return t
    raise ConfigError(f"no technique is registered for config type {type(config).__name__}")


def check_chain(previous: list[str], technique: str) -> None:
    """Raise `ChainError` when `technique` may not follow the last of the `previous` techniques."""
    from slimkit.errors import ChainError

    if not previous:
        return
    last = get(previous[-1])
    if last.next is not None and technique not in last.next:
        allowed = ", ".join(last.next) if last.next else "nothing: it must be the last stage"
        raise ChainError(f"{technique} cannot follow {last.name} (after {last.name} may come {allowed}); "
                         f"apply {technique} before {last.name}")


def check_model_chain(model: nn.Module, technique: str) -> None:
    """`check_chain` for what was applied to `model` (its recorded stages)."""
    check_chain(applied(model), technique)


def chained(technique: str):
    """Decorator for a technique's entry point `fn(model, ...)`: `check_model_chain` before any work."""
    def wrap(fn):
        @functools.wraps(fn)
        def checked(model, *args, **kwargs):
            check_model_chain(model, technique)
            return fn(model, *args, **kwargs)
        return checked
    return wrap


def apply(model: nn.Module, config: Config, *, task: Task | None = None, **kwargs: Any) -> nn.Module:
    """Apply the technique the config's type belongs to; returns a new model."""
    technique = for_config(config)
    check_model_chain(model, technique.name)
    return technique.apply(model, config, task=task, **kwargs)

"""Helpers shared by CLI commands: resolving model and data references, printing, errors.

Technique packages add their own subcommands in `slimkit/<pkg>/cli.py` with a function
`register(app: typer.Typer)`; `slimkit.cli.main` discovers them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import typer
from rich.console import Console

from slimkit.core.task import Task
from slimkit.errors import ModelError

console = Console(soft_wrap=True)  # whole lines in logs and pipes

# Every command that reads a model file takes this flag (slimkit.load's `trust_factory`).
TrustFactoryOpt = typer.Option(
    False, "--trust-factory",
    help="let a model file name a builder (package.module:function) that slimkit does not trust: it is imported "
         "and run. Only for files whose origin you trust; zoo models and NAS architectures never need it.")


PATIENCE_HELP = "early stopping of the recovery on validation (best epoch kept): epochs, auto or none"


def parse_patience(value: str, option: str = "--patience") -> int | str | None:
    """A --patience value: a number of epochs (>= 1), "auto" or "none"."""
    from slimkit.errors import ConfigError

    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{option}: expected a number of epochs >= 1, 'auto' or 'none', got {value!r}")
    return number


def load_task(ref: str) -> Task:
    """`digits`, `mnist:DIR`, `npz:FILE`, `imagefolder:DIR`."""
    from slimkit.data import resolve

    return resolve(ref)


def load_model(ref: str, *, weights: str | None = None, task: Task | None = None, seed: int | None = None,
               trust_factory: bool = False, untrained_note: bool = True) -> nn.Module:
    """A model reference: `zoo:NAME`, `torchvision:NAME` / `timm:NAME` / `hf:TYPE_OR_DIR` (random weights), a saved slimkit
    artifact (file path), or
    `package.module:factory` together with `weights` (a safetensors file). `seed` fixes a zoo
    model's random initialization; `untrained_note` says when a zoo model has random weights.

    A factory typed on the command line is the user's choice: it is imported and called. A factory
    named inside a model file is called only with `trust_factory` (see `slimkit.load`)."""
    model = _resolve_model(ref, weights=weights, task=task, seed=seed, trust_factory=trust_factory)
    if untrained_note and not weights and (_external(ref) or ref.startswith("zoo:") and random_init(ref[4:])):
        console.print(f"note: {ref} has no trained weights (random initialization; pass --weights or a saved "
                      "model): its accuracy means nothing", markup=False, highlight=False)
    if task is not None:  # inputs it cannot take or labels past its outputs fail now, before any work
        from slimkit.core.trainer import check_model_fits

        device = next((p.device for p in model.parameters()), None)
        check_model_fits(model, task, device or torch.device("cpu"), split="test")
    return model


def _external(ref: str) -> bool:
    """A torchvision:/timm:/hf: reference (`slimkit.zoo.external`)."""
    from slimkit.zoo.external import KINDS

    return ref.partition(":")[0] in KINDS


def random_init(name: str) -> bool:
    from slimkit import zoo

    return name in zoo.ZOO and zoo.ZOO[name].extra is None  # extras ship real pretrained weights


def _resolve_model(ref: str, *, weights: str | None, task: Task | None, seed: int | None,
                   trust_factory: bool) -> nn.Module:
    from slimkit import zoo
    from slimkit.core.artifact import load, load_factory_weights, load_weights, read_tensors

    if _external(ref):
        from slimkit.zoo.external import external

        shaped = {}
        if task is not None and task.num_classes is not None and not ref.startswith("hf:"):
            shaped["num_classes"] = task.num_classes
        if task is not None and ref.startswith("timm:") and len(task.input_shape) == 3 and task.input_shape[0] != 3:
            shaped["in_chans"] = task.input_shape[0]
        model = external(ref, **shaped)
        if weights:
            load_weights(model, read_tensors(weights), origin=weights)
        return model
    if ref.startswith("zoo:"):
        name = ref[4:]
        model = zoo.for_task(name, task, seed=seed) if task is not None and name in zoo.ZOO else zoo.build(name, seed=seed)
        if weights:
            load_weights(model, read_tensors(weights), origin=weights)
        return model
    path = Path(ref)
    if path.suffix in (".safetensors", ".slim") or path.exists():
        if weights:
            raise ModelError("--weights goes with a factory reference (package.module:function), not a saved model")
        return load(path, trust_factory=trust_factory)
    if ":" in ref:
        if not weights:
            raise ModelError(f"factory reference {ref!r} needs --weights FILE.safetensors")
        return load_factory_weights(ref, weights)
    raise ModelError(f"cannot resolve model {ref!r}: use zoo:NAME, torchvision:NAME, timm:NAME, hf:TYPE_OR_DIR, a saved .safetensors model, "
                     "or package.module:factory with --weights")


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def print_accuracy_change(before: nn.Module, after: nn.Module, task: Task) -> None:
    """`test accuracy A% -> B%` for classification data (nothing for other metrics)."""
    if task.metric != "accuracy":
        return
    from slimkit.evaluate import predict, topk_accuracy

    a, b = (topk_accuracy(*predict(m, task, "test"))["top1"] for m in (before, after))
    console.print(f"test accuracy {100 * a:.2f}% -> {100 * b:.2f}%", markup=False, highlight=False)

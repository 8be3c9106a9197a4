"""Structured pruning: remove whole channels / neurons with torch-pruning's dependency graph.

    small = slimkit.prune(model, slimkit.StructuredPruneConfig(target_macs=0.5), task=task)

The result is a physically smaller dense model. The kept shapes of every changed layer are recorded
in the stage `structure`, and `restore_structured` rebuilds them on a freshly built source model, so
`slimkit.save` / `slimkit.load` work without user code.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from slimkit.core.selector import get_submodule
from slimkit.core.registry import chained
from slimkit.core.state import copy_model, record_stage
from slimkit.core.task import Task
from slimkit.core.recovery import recover, recovery_note
from slimkit.errors import ConfigError, ModelError, UnsupportedLayerError
from slimkit.evaluate.metrics import _call, count_macs
from slimkit.prune.config import StructuredPruneConfig

# attributes that describe a layer's channel counts; restored together with the parameter shapes
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape", "num_parameters", "embedding_dim", "num_channels")


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _check_traceable(model: nn.Module) -> None:
    """Refuse layers holding parameters torch-pruning has no pruner for: it would silently cut their
    last dimension. Name the first such layer."""
    import torch_pruning as tp

    known = set(tp.pruner.function.PrunerBox)
    for name, module in model.named_modules():
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        op = tp.ops.module2type(module)
        if op not in known or op == tp.ops.OPTYPE.ELEMENTWISE:
            raise UnsupportedLayerError(
                f"structured pruning: layer {name or '<root>'!r} ({type(module).__name__}) holds parameters "
                f"{own} that the dependency graph cannot prune consistently; wrap them in standard layers "
                "(Conv/Linear/BatchNorm/LayerNorm) or use unstructured pruning")


def _ignored_layers(model: nn.Module, config: StructuredPruneConfig) -> list[nn.Module]:
    """The classifier (last Linear/Conv) plus every layer the selector leaves out."""
    import fnmatch

    prunable = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not prunable:
        raise UnsupportedLayerError(f"structured pruning: {type(model).__name__} has no Conv or Linear layer")
    sel = config.selector
    ignored = [prunable[-1][1]]
    for name, module in prunable[:-1]:
        included = any(fnmatch.fnmatchcase(name, p) for p in sel.include)
        excluded = any(fnmatch.fnmatchcase(name, p) for p in sel.exclude)
        if not included or excluded:
            ignored.append(module)
    if len(ignored) == len(prunable):
        from slimkit.errors import SelectorError

        raise SelectorError(f"structured pruning: selector include={sel.include} exclude={sel.exclude} leaves no "
                            f"prunable layer in {type(model).__name__} (the last layer, {prunable[-1][0]!r}, is the "
                            "classifier and is always kept)")
    return ignored


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, module in model.named_modules():
        tensors = {k: v for k, v in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
                   if v is not None}
        if not tensors:
            continue
        out[name] = {
            "tensors": {k: [list(v.shape), str(v.dtype).replace("torch.", ""), isinstance(v, nn.Parameter)]
                        for k, v in tensors.items()},
            "attrs": {a: (list(getattr(module, a)) if isinstance(getattr(module, a), tuple) else getattr(module, a))
                      for a in _SHAPE_ATTRS if hasattr(module, a)},
        }
    return out


def _taylor_grads(model: nn.Module, task: Task, batches: int) -> None:
    model.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(task.loader("train", shuffle=True, seed=0)):
        if i >= batches:
            break
        task.loss(model(x), y).backward()


def prune_channels(model: nn.Module, config: StructuredPruneConfig, task: Task) -> tuple[nn.Module, dict]:
    """Remove channels in place until the MACs target (or the uniform ratio) is reached; no fine-tuning.

    Returns (model, info) with MACs before/after. Used by `prune_structured` and by the benchmark.
    """
    import torch_pruning as tp

    example = task.example_input(1, split="train")
    _check_traceable(model)
    ignored = _ignored_layers(model, config)
    steps = config.max_steps if config.target_macs is not None else 1
    # with a MACs target, ratios rise in small steps up to a ceiling; stop at the first step under it
    ratio = 0.9 if config.target_macs is not None else config.ratio
    model.eval()
    try:
        base_macs = count_macs(model, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, example, importance=_importance(config.importance),
                                          global_pruning=config.scope == "global", pruning_ratio=ratio,
                                          iterative_steps=steps, ignored_layers=ignored, round_to=config.round_to)
    except Exception as err:  # the forward or the tracer fails inside the user's model
        raise UnsupportedLayerError(f"structured pruning: torch-pruning cannot trace {type(model).__name__} "
                                    f"({type(err).__name__}: {err})") from None
    macs = base_macs
    with torch.no_grad():
        shape = _call(model, example).shape
    for _ in range(steps):
        if config.importance == "taylor":
            _taylor_grads(model, task, config.taylor_batches)
        try:
            pruner.step()
            model.zero_grad(set_to_none=True)
            macs = count_macs(model, example)
            with torch.no_grad():
                pruned_shape = _call(model, example).shape
        except Exception as err:  # the graph missed a coupling (e.g. a reshape into attention heads)
            raise UnsupportedLayerError(
                f"structured pruning: removing channels breaks {type(model).__name__}'s forward ({type(err).__name__}: "
                f"{str(err)[:200]}); a reshape or split couples channels the dependency graph does not see (for "
                "attention heads use prune_heads) — exclude those layers with the selector") from None
        if pruned_shape != shape:
            raise UnsupportedLayerError(f"structured pruning changed {type(model).__name__}'s output shape "
                                        f"{tuple(shape)} -> {tuple(pruned_shape)}; exclude the layers feeding the output")
        if config.target_macs is not None and macs <= config.target_macs * base_macs:
            break
    if config.target_macs is not None and macs > config.target_macs * base_macs:
        from slimkit.errors import InfeasibleError

        raise InfeasibleError(f"structured pruning reached {macs / base_macs:.2f} of the MACs, not "
                              f"{config.target_macs}; exclude fewer layers or lower the target")
    return model, {"macs_before": base_macs, "macs_after": macs}


@chained("prune_structured")
def prune_structured(model: nn.Module, config: StructuredPruneConfig | None = None, *, task: Task | None = None,
                     **_: object) -> nn.Module:
    """Remove channels/neurons to `config.target_macs` of the MACs (or by `config.ratio`), then recover
    accuracy; returns a new, physically smaller model. The input model is not modified."""
    config = config or StructuredPruneConfig()
    if task is None:
        raise ConfigError("structured pruning needs data (an example input to trace and fine-tune on): pass task=")
    before = layer_shapes(model)
    new = copy_model(model)
    new, info = prune_channels(new, config, task)
    for p in new.parameters():
        p.requires_grad_(True)
    after = layer_shapes(new)
    changed = {n: spec for n, spec in after.items() if before.get(n) != spec}
    new = recover(new, model, task, config.recovery, seed=config.seed, description="prune_structured: recover")
    structure = {"modules": changed, **info}
    record_stage(new, "prune_structured", config, structure)
    note = (f"structured: {len(changed)} layers shrunk, MACs {info['macs_before']:,} -> {info['macs_after']:,} "
            f"({info['macs_after'] / info['macs_before']:.2f}x), physically smaller dense model")
    new.slimkit_notes = list(getattr(model, "slimkit_notes", []) or []) + [note] + recovery_note(new, "structured")
    return new


def restore_structured(model: nn.Module, config: StructuredPruneConfig, structure: dict) -> nn.Module:
    """Give a freshly built source model the pruned layer shapes recorded in `structure`
    (weights are loaded afterwards)."""
    for name, spec in structure.get("modules", {}).items():
        try:
            module = get_submodule(model, name) if name else model
        except Exception:
            raise ModelError(f"cannot restore structured pruning: layer {name!r} does not exist in "
                             f"{type(model).__name__}") from None
        for attr, value in spec.get("attrs", {}).items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for tname, (shape, dtype, is_param) in spec.get("tensors", {}).items():
            tensor = torch.zeros(shape, dtype=getattr(torch, dtype))
            if is_param:
                setattr(module, tname, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
            else:
                module.register_buffer(tname, tensor)
    return model

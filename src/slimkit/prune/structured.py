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
# attention layers reshape their projections into (heads, head size): the sizes they read at forward
_HEAD_ATTRS = ("num_heads", "head_dim", "attn_dim", "num_attention_heads", "attention_head_size", "all_head_size",
               "n_heads", "dim")
# (head count attribute, projection children, head size attributes to set after pruning)
_ATTENTION = [
    ("num_heads", ("qkv",), {"head_dim": lambda m: m.qkv.out_features // (3 * m.num_heads),  # timm ViT/DeiT/...
                             "attn_dim": lambda m: m.qkv.out_features // 3}),
    ("num_attention_heads", ("query", "key", "value"),  # BERT, RoBERTa, ViT (transformers)
     {"attention_head_size": lambda m: m.query.out_features // m.num_attention_heads,
      "all_head_size": lambda m: m.query.out_features}),
    ("n_heads", ("q_lin", "k_lin", "v_lin"),  # DistilBERT
     {"attention_head_size": lambda m: m.q_lin.out_features // m.n_heads, "dim": lambda m: m.q_lin.out_features}),
]


def attention_layers(model: nn.Module) -> list[tuple[nn.Module, str, tuple[nn.Linear, ...], dict]]:
    """The attention modules whose projections the dependency graph must cut head by head: (module, the name of
    its head count, its q/k/v projections, the head-size attributes to recompute after pruning)."""
    found = []
    for module in model.modules():
        for heads, names, sizes in _ATTENTION:
            projections = tuple(getattr(module, n, None) for n in names)
            if isinstance(getattr(module, heads, None), int) and all(isinstance(p, nn.Linear) for p in projections):
                found.append((module, heads, projections, sizes))
    return found


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _channel_dim(shape: tuple[int, ...]) -> int | None:
    """The dimension of a free-standing parameter that is unambiguously its channel dimension: a vector in
    any singleton-padded shape (a ConvNeXt/LayerScale gamma, an RMSNorm weight, a (1, 1, D) class token) or a
    (1, N, D) position embedding, whose channels are last (as every ViT stores them). None otherwise."""
    big = [i for i, n in enumerate(shape) if n != 1]
    if len(big) == 1:
        return big[0]
    if len(shape) == 3 and shape[0] == 1:
        return 2
    return None


def _check_traceable(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Refuse layers holding parameters torch-pruning has no pruner for when their channel dimension is
    ambiguous (it would silently cut their last dimension); name the first such layer. Returns the others
    (vectors, class tokens, position embeddings) with the dimension to prune, for the dependency graph."""
    import torch_pruning as tp

    known = set(tp.pruner.function.PrunerBox)
    unwrapped = []
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not own:
            continue
        op = tp.ops.module2type(module)
        if op in known and op != tp.ops.OPTYPE.ELEMENTWISE:
            continue
        for pname, param in own:
            dim = _channel_dim(tuple(param.shape))
            if dim is None:
                raise UnsupportedLayerError(
                    f"structured pruning: layer {name or '<root>'!r} ({type(module).__name__}) holds parameter "
                    f"{pname!r} of shape {tuple(param.shape)} whose channel dimension the dependency graph cannot "
                    "tell; wrap it in standard layers (Conv/Linear/BatchNorm/LayerNorm) or use unstructured pruning")
            unwrapped.append((param, dim))
    return unwrapped


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
        heads = {a: getattr(module, a) for a in _HEAD_ATTRS if isinstance(getattr(module, a, None), int)}
        if heads and not tensors:
            out[name] = {"tensors": {}, "attrs": heads}
        if not tensors:
            continue
        out[name] = {
            "tensors": {k: [list(v.shape), str(v.dtype).replace("torch.", ""), isinstance(v, nn.Parameter)]
                        for k, v in tensors.items()},
            "attrs": {**{a: (list(getattr(module, a)) if isinstance(getattr(module, a), tuple) else getattr(module, a))
                         for a in _SHAPE_ATTRS if hasattr(module, a)}, **heads},
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
    unwrapped = _check_traceable(model)
    ignored = _ignored_layers(model, config)
    steps = config.max_steps if config.target_macs is not None else 1
    # with a MACs target, ratios rise in small steps up to a ceiling; stop at the first step under it
    ratio = 0.9 if config.target_macs is not None else config.ratio
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
            # (torch-pruning's dependency graph does not finish on these: refused before it starts)
            raise UnsupportedLayerError(
                f"structured pruning: attention {name!r} ({type(module).__name__}) with separate q/k/v projections "
                "(Llama, Mistral, OPT, BART style; grouped key/value heads) is not supported; use prune "
                "(unstructured), factorize or quantize")
    attention = attention_layers(model)
    num_heads = {p: getattr(m, heads) for m, heads, projections, _ in attention for p in projections}
    model.eval()
    try:
        base_macs = count_macs(model, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, example, importance=_importance(config.importance),
                                          global_pruning=config.scope == "global", pruning_ratio=ratio,
                                          iterative_steps=steps, ignored_layers=ignored, round_to=config.round_to,
                                          unwrapped_parameters=unwrapped, num_heads=num_heads,
                                          prune_head_dims=True, prune_num_heads=False)
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
            for module, _, _, sizes in attention:  # heads keep their count, each head is narrower
                for attr, size in sizes.items():
                    setattr(module, attr, size(module))
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

"""Structured pruning of Transformer encoders: attention heads and feed-forward neurons.

    small = slimkit.prune(encoder, slimkit.HeadPruneConfig(heads=0.5, ffn=0.5))

Heads and neurons are removed for real: the query/key/value Linears lose the rows of a removed head
and the attention output projection its columns; the intermediate Linear loses a neuron's row and
the feed-forward output Linear its column. The attention computation reshapes by head size, so
the module keeps working with fewer heads. The kept shapes are recorded like channel pruning's, so
`slimkit.save` / `slimkit.load` rebuild the smaller model from the original source.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.core.selector import get_submodule
from slimkit.core.registry import chained
from slimkit.core.state import copy_model, record_stage
from slimkit.core.task import Task
from slimkit.errors import ConfigError, UnsupportedLayerError
from slimkit.prune.config import HeadPruneConfig
from slimkit.prune.structured import layer_shapes, restore_structured
from slimkit.core.recovery import recover


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Linear]]:
    """(name, attention module, its output projection) for every BERT-style self-attention."""
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "attention_head_size") and all(
                isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value")):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            try:
                out = get_submodule(model, f"{parent}.output.dense" if parent else "output.dense")
            except Exception:
                continue
            if isinstance(out, nn.Linear) and out.in_features == module.query.out_features:
                found.append((name, module, out))
    return found


def ffn_blocks(model: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """(layer name, intermediate Linear, output Linear) for every BERT-style feed-forward pair."""
    found = []
    for name, module in model.named_modules():
        inter = getattr(getattr(module, "intermediate", None), "dense", None)
        out = getattr(getattr(module, "output", None), "dense", None)
        if isinstance(inter, nn.Linear) and isinstance(out, nn.Linear) and inter.out_features == out.in_features:
            found.append((name, inter, out))
    return found


def _keep_rows(layer: nn.Linear, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[idx].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[idx].clone())
    layer.out_features = len(idx)


def _keep_cols(layer: nn.Linear, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[:, idx].clone())
    layer.in_features = len(idx)


def _lowest(scores: torch.Tensor, fraction: float) -> list[int]:
    """Indices of the `fraction` lowest scores (at least one entry always stays)."""
    n = len(scores)
    drop = min(int(n * fraction), n - 1)
    return sorted(torch.argsort(scores)[:drop].tolist())


@torch.no_grad()
def _remove_heads(attention: list, fraction: float) -> tuple[dict, dict]:
    """Remove the `fraction` lowest-norm heads of every attention block in place; returns
    ({block: removed head indices}, {block: attributes to restore})."""
    heads_removed, attrs = {}, {}
    for name, attn, out in attention:
        size = attn.attention_head_size
        n = attn.query.out_features // size
        per_head = lambda w: w.reshape(n, size, -1).pow(2).sum((1, 2))  # noqa: E731  rows of one head
        scores = (per_head(attn.query.weight) + per_head(attn.key.weight) + per_head(attn.value.weight)
                  + out.weight.reshape(out.out_features, n, size).pow(2).sum((0, 2)))
        gone = _lowest(scores, fraction)
        kept = [h for h in range(n) if h not in gone]
        idx = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept])
        for layer in (attn.query, attn.key, attn.value):
            _keep_rows(layer, idx)
        _keep_cols(out, idx)
        attn.num_attention_heads, attn.all_head_size = len(kept), len(kept) * size
        heads_removed[name] = gone
        attrs[name] = {"num_attention_heads": len(kept), "all_head_size": len(kept) * size}
    return heads_removed, attrs


@torch.no_grad()
def _remove_neurons(ffn: list, fraction: float) -> dict:
    """Remove the `fraction` lowest-norm neurons of every feed-forward pair in place; returns
    {layer: [neurons before, after]}."""
    neurons = {}
    for name, inter, out in ffn:
        scores = inter.weight.pow(2).sum(1) + out.weight.pow(2).sum(0)
        gone = set(_lowest(scores, fraction))
        idx = torch.tensor([i for i in range(inter.out_features) if i not in gone])
        neurons[name] = [inter.out_features, len(idx)]
        _keep_rows(inter, idx)
        _keep_cols(out, idx)
    return neurons


@chained("prune_heads")
def prune_heads(model: nn.Module, config: HeadPruneConfig | None = None, *, task: Task | None = None,
                **_: object) -> nn.Module:
    """Remove attention heads and feed-forward neurons; returns a new, smaller model."""
    config = config or HeadPruneConfig()
    if not isinstance(config, HeadPruneConfig):
        raise ConfigError(f"prune_heads expects a HeadPruneConfig, got {type(config).__name__}")
    new = copy_model(model)
    attention, ffn = attention_blocks(new), ffn_blocks(new)
    if not attention and not ffn:
        raise UnsupportedLayerError(
            f"prune_heads: {type(model).__name__} has no BERT-style attention (a module with query/key/value "
            "Linear children and attention_head_size) and no intermediate/output feed-forward pair; for CNNs use "
            "StructuredPruneConfig")
    if config.recovery.active and task is None:
        raise ConfigError("prune_heads with recovery needs data: pass task=, or set recovery: none")
    before = layer_shapes(new)
    params_before = sum(p.numel() for p in new.parameters())
    heads_removed, attrs = _remove_heads(attention, config.heads) if config.heads > 0 else ({}, {})
    neurons = _remove_neurons(ffn, config.ffn) if config.ffn > 0 else {}
    for p in new.parameters():
        p.requires_grad_(True)
    after = layer_shapes(new)
    changed = {n: spec for n, spec in after.items() if before.get(n) != spec}
    new = recover(new, model, task, config.recovery, seed=config.seed, description="prune_heads: recover")
    params_after = sum(p.numel() for p in new.parameters())
    record_stage(new, "prune_heads", config, {"modules": changed, "attention": attrs, "heads_removed": heads_removed,
                                              "ffn_neurons": neurons, "params_before": params_before,
                                              "params_after": params_after})
    total_heads = sum(a.num_attention_heads for _, a, _ in attention_blocks(new))
    new.slimkit_notes = list(getattr(model, "slimkit_notes", []) or []) + [
        f"prune_heads: {sum(len(g) for g in heads_removed.values())} attention heads removed in {len(heads_removed)} "
        f"layers ({total_heads} kept), feed-forward neurons {sum(b for b, _ in neurons.values()):,} -> "
        f"{sum(a for _, a in neurons.values()):,}; parameters {params_before:,} -> {params_after:,} "
        "(physically smaller dense model)"]
    return new


def restore_heads(model: nn.Module, config: HeadPruneConfig, structure: dict) -> nn.Module:
    """Give a freshly built source model the recorded smaller shapes (weights are loaded afterwards)."""
    model = restore_structured(model, config, structure)
    for name, values in structure.get("attention", {}).items():
        module = get_submodule(model, name)
        for attr, value in values.items():
            setattr(module, attr, value)
    return model

"""Registration of the pruning family: `prune` (unstructured / N:M), `prune_structured`
(channels, via torch-pruning) and `pack` (Deep-Compression `.slim` files), plus the `.slim`
loader and exporter."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimkit.core.artifact import register_loader
from slimkit.core import registry
from slimkit.core.registry import Technique, register
from slimkit.core.state import last_stage
from slimkit.core.task import Task
from slimkit.errors import ConfigError
from slimkit.export.base import register_exporter
from slimkit.prune.config import HeadPruneConfig, PackConfig, PruneConfig, StructuredPruneConfig
from slimkit.prune.pack import quantize_values
from slimkit.prune.packed import read_packed, write_packed
from slimkit.prune.report import sensitivity_section
from slimkit.prune.structured import prune_structured, restore_structured
from slimkit.prune.transformer import prune_heads, restore_heads
from slimkit.prune.unstructured import prune_unstructured


def prune(model: nn.Module, config: PruneConfig | StructuredPruneConfig | HeadPruneConfig | None = None, *,
          task: Task | None = None) -> nn.Module:
    """Prune `model`; returns a new model (the input is not modified).

    `PruneConfig` -> unstructured or N:M sparsity with real zeros;
    `StructuredPruneConfig` -> channels/neurons removed (a smaller dense model);
    `HeadPruneConfig` -> attention heads and feed-forward neurons of Transformer encoders removed.

        small = slimkit.prune(model, slimkit.PruneConfig(sparsity=0.9, scope="global"), task=task)
    """
    config = config or PruneConfig()
    if isinstance(config, (PruneConfig, StructuredPruneConfig, HeadPruneConfig)):
        return registry.for_config(config).apply(model, config, task=task)
    raise ConfigError(f"slimkit.prune takes a PruneConfig, StructuredPruneConfig or HeadPruneConfig, not "
                      f"{type(config).__name__}")


def _slim_path(path_without_suffix: Path) -> Path:
    return Path(f"{path_without_suffix}.slim")


def _write_slim(model: nn.Module, path_without_suffix: Path, task: Task | None = None) -> Path:
    stage = last_stage(model, "pack")
    config = PackConfig.from_dict(stage["config"]) if stage else PackConfig()
    path = _slim_path(path_without_suffix)
    write_packed(model, path, index=config.index, level=config.level)
    return path


def _export_slim(model: nn.Module, path: Path, example_input=None, **kwargs) -> Path:
    write_packed(model, path, **kwargs)
    return Path(path)


# -- what the advisor may try (`Technique.candidates`; `auto` is its AutoConfig) --------------------------
def _structured_candidates(auto) -> dict[str, dict]:
    return {f"macs{round(100 * t)}": {"target_macs": t, "seed": auto.seed,
                                      "recovery": {"method": "distill", "epochs": auto.recovery_epochs, "lr": 2e-3}}
            for t in auto.structured_targets}


def _describe_structured(label: str) -> str:
    return f"remove channels down to {label[len('macs'):]}% of the MACs"


def _pack_candidates(auto) -> dict[str, dict]:
    """Packed with 5/8-bit k-means codebooks, unpruned or after iterative pruning to each of the advisor's
    sparsities (one-shot 90% with a short fine-tune costs several points)."""
    def config(sparsity: float | None) -> dict:
        prune = None if sparsity is None else {
            "sparsity": sparsity, "scope": "global", "schedule": "iterative", "steps": 3, "seed": auto.seed,
            "recovery": {"method": "distill", "epochs": auto.prune_epochs}}
        return {"quantization": "kmeans", "bits": 5, "conv_bits": 8, "codebook_epochs": auto.codebook_epochs,
                "prune": prune, "seed": auto.seed}

    return {"kmeans": config(None), **{f"prune{round(100 * s)}": config(s) for s in auto.sparsities}}


def _describe_pack(label: str) -> str:
    pruned = f"prune {label[len('prune'):]}% of the weights, " if label.startswith("prune") else ""
    return pruned + "5/8-bit k-means weight sharing, packed .slim"


register(Technique(
    name="prune", family="prune", config_cls=PruneConfig, apply=prune_unstructured,
    summary="unstructured / N:M magnitude or Taylor pruning, global or per layer, real zeros stored sparse (.slim)",
    restore=None,
    demo=lambda model, task: PruneConfig(sparsity=0.9, scope="sensitivity", recovery={"epochs": 3}),
    write_artifact=_write_slim, runtime="torch", order=20, sections={"sensitivity": sensitivity_section},
))
register(Technique(
    name="prune_structured", family="prune", config_cls=StructuredPruneConfig, apply=prune_structured,
    summary="remove channels/neurons with a dependency graph (torch-pruning) to a MACs target; smaller dense model",
    restore=restore_structured,
    demo=lambda model, task: StructuredPruneConfig(target_macs=0.5, recovery={"epochs": 3}),
    write_artifact=None, runtime="torch", order=21,
    candidates=_structured_candidates, describe=_describe_structured,
))
register(Technique(
    name="prune_heads", family="prune", config_cls=HeadPruneConfig, apply=prune_heads,
    summary="remove attention heads and feed-forward neurons of BERT-style encoders; smaller dense model",
    restore=restore_heads, demo=None, write_artifact=None, runtime="torch", order=23,
))
register(Technique(
    name="pack", family="prune", config_cls=PackConfig, apply=quantize_values,
    summary="Deep Compression: prune + k-means shared weights + sparse index + zstd into a .slim file",
    restore=None,
    demo=lambda model, task: PackConfig(prune=PruneConfig(sparsity=0.9, recovery={"epochs": 3}), codebook_epochs=1),
    write_artifact=_write_slim, runtime="torch", order=22, candidates=_pack_candidates, describe=_describe_pack,
    next=(),  # final: the .slim file stores its codebooks; a later stage would change weights it fixed
))
register_loader(".slim", read_packed)
register_exporter(".slim", _export_slim)

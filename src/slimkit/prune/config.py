"""Configs of the pruning family: unstructured / N:M (`PruneConfig`), structured
(`StructuredPruneConfig`) and Deep-Compression packing (`PackConfig`)."""
from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from slimkit.core.config import Config
from slimkit.core.recovery import PRUNE_KEYS, RecoveringConfig, RecoveryConfig, recovery_field
from slimkit.core.selector import Selector

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """`"2:4"` -> (2, 4) (keep N of every M); `"unstructured"` -> None."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M)")
    return n, m


class PruneConfig(RecoveringConfig):
    """Unstructured or N:M weight pruning; the zeros are real (masks removed at the end).

    sparsity: fraction of the selected weights set to zero, in [0, 1).
    scope: "global" (one threshold across all selected layers), "layer" (each layer pruned to its
        own sparsity: `sparsity`, or `layer_sparsity` where a pattern matches) or "sensitivity"
        (per-layer sparsities chosen from measured accuracy-vs-sparsity curves so that the whole
        selection reaches `sparsity`).
    layer_sparsity: {"layer-name pattern": sparsity} overrides for scope "layer".
    pattern: "unstructured" or "N:M" (keep N of every M consecutive input weights, e.g. "2:4";
        `sparsity` is then implied as 1 - N/M).
    importance: "l1" / "l2" (weight magnitude; they rank single weights identically) or
        "taylor" (|weight x gradient| accumulated over `taylor_batches` training batches).
    schedule: "oneshot" (prune, then fine-tune), "iterative" (`steps` rounds of prune + fine-tune,
        sparsity rising geometrically) or "gradual" (polynomial AGP ramp during fine-tuning).
    recovery: `RecoveryConfig` (default: fine-tune on the task's loss, at most 5 epochs for all rounds
        together, early-stopped on validation; "distill" learns soft targets from the unpruned model).
        Early stopping is not used by schedule="gradual" (its sparsity rises during fine-tuning, so an
        earlier epoch is a less sparse model).
    """

    technique: ClassVar[str] = "prune"
    legacy_recovery_keys: ClassVar = PRUNE_KEYS

    sparsity: float = Field(0.9, ge=0.0, lt=1.0)
    scope: Literal["global", "layer", "sensitivity"] = "global"
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
    pattern: str = "unstructured"
    importance: Literal["l1", "l2", "taylor"] = "l1"
    schedule: Literal["oneshot", "iterative", "gradual"] = "oneshot"
    steps: int = Field(3, ge=1)
    recovery: RecoveryConfig = recovery_field("finetune", epochs=5)
    taylor_batches: int = Field(8, ge=1)
    sensitivity_grid: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    selector: Selector = Field(default_factory=Selector)
    seed: int = 0

    @field_validator("layer_sparsity")
    @classmethod
    def _check_layer_sparsity(cls, value: dict[str, float]) -> dict[str, float]:
        for name, s in value.items():
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity for layer {name!r} is {s}; it must be in [0, 1)")
        return value

    @field_validator("sensitivity_grid")
    @classmethod
    def _check_grid(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < s < 1.0 for s in value):
            raise ValueError("sensitivity_grid needs sparsities in (0, 1)")
        return sorted(value)

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        parse_nm(value)
        return value

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)


class StructuredPruneConfig(RecoveringConfig):
    """Remove whole channels / neurons (a physically smaller dense model), via torch-pruning's
    dependency graph so residual adds, depthwise convs and concatenations stay consistent.

    target_macs: fraction of the original MACs to keep (e.g. 0.5); channels are removed in small
        steps until the model is at or below it. None: prune every layer by `ratio` instead.
    ratio: channel pruning ratio per layer (used when target_macs is None; upper bound otherwise).
    scope: "uniform" (same ratio in every layer) or "global" (one importance ranking across layers).
    importance: "l1" / "l2" (filter norm), "bn_scale" (batch-norm gamma, network slimming) or
        "taylor" (first-order |w x grad| over `taylor_batches` batches).
    selector: layers never pruned (exclude patterns); the classifier layer is always kept.
    round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly shapes).
    recovery: `RecoveryConfig` (default: distill from the unpruned model, at most 5 epochs).
    """

    technique: ClassVar[str] = "prune_structured"
    legacy_recovery_keys: ClassVar = PRUNE_KEYS

    target_macs: float | None = Field(0.5, gt=0.0, lt=1.0)
    ratio: float = Field(0.5, gt=0.0, lt=1.0)
    scope: Literal["uniform", "global"] = "uniform"
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    max_steps: int = Field(40, ge=1)
    round_to: int | None = Field(None, ge=1)
    recovery: RecoveryConfig = recovery_field("distill", epochs=5)
    taylor_batches: int = Field(8, ge=1)
    selector: Selector = Field(default_factory=Selector)
    seed: int = 0


class PackConfig(Config):
    """Deep-Compression packing into a `.slim` file: sparse index + quantized values + zstd.

    quantization: "kmeans" (weight sharing, one codebook per layer, optionally fine-tuned),
        "linear" (symmetric uniform levels) or "none" (values kept exactly, fp32).
    bits / conv_bits: value bits for Linear / Conv layers (Deep Compression: 5 and 8).
    codebook_epochs: epochs of codebook (centroid) fine-tuning with the task (kmeans only; 0: off).
    index: "auto" (smallest of dense codes, bitmask, relative indices with 1..8 bits) or one of them.
    dense_dtype: storage dtype of tensors that are not quantized (biases, norms).
    level: zstd compression level (1..22).
    selector: which layers' weights are quantized (default: Linear and Conv2d).
    prune: optional unstructured pruning run first (the full Deep-Compression pipeline in one stage).
    budget: accuracy budget in validation points (e.g. 0.3). When set, pack searches the per-layer
        sparsity and code bits itself (`slimkit.prune.deep`: sensitivity scan, a pruning ladder
        climbed with early-stopped recovery, fewest bits per layer) and `bits`, `conv_bits` and
        `prune.sparsity` are not used; `prune` then only sets the recovery (default: distillation
        from the unpruned model), and `codebook_epochs` is the most codebook fine-tuning per try.
    sparsity_ladder / step_epochs / patience: the overall sparsities climbed, the most recovery
        epochs per rung and the early-stopping patience (budget search).
    bits_grid: code bits tried per layer; quant_share: the part of `budget` left to quantization.
    """

    technique: ClassVar[str] = "pack"

    quantization: Literal["kmeans", "linear", "none"] = "kmeans"
    bits: int = Field(5, ge=1, le=8)
    conv_bits: int = Field(8, ge=1, le=8)
    codebook_epochs: int = Field(0, ge=0)
    lr: float = Field(1e-4, gt=0)
    index: Literal["auto", "dense", "bitmask", "relative"] = "auto"
    dense_dtype: Literal["float32", "float16"] = "float32"
    level: int = Field(19, ge=1, le=22)
    selector: Selector = Field(default_factory=Selector)
    prune: PruneConfig | None = None
    budget: float | None = Field(None, ge=0.0)
    sparsity_ladder: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.94, 0.96, 0.97, 0.98, 0.985, 0.99])
    step_epochs: int = Field(10, ge=0)
    patience: int = Field(2, ge=1)
    bits_grid: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    quant_share: float = Field(1 / 3, gt=0.0, lt=1.0)
    seed: int = 0

    @field_validator("sparsity_ladder")
    @classmethod
    def _check_ladder(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < s < 1.0 for s in value):
            raise ValueError("sparsity_ladder needs sparsities in (0, 1)")
        return sorted(value)

    @field_validator("bits_grid")
    @classmethod
    def _check_bits(cls, value: list[int]) -> list[int]:
        if not value or any(not 1 <= b <= 8 for b in value):
            raise ValueError("bits_grid needs code bits in 1..8")
        return sorted(set(value))


class HeadPruneConfig(RecoveringConfig):
    """Structured pruning of Transformer encoder layers (BERT-style: an attention module with `query`,
    `key`, `value` Linear children and `attention_head_size`, its `output.dense` projection, and an
    `intermediate.dense` / `output.dense` feed-forward pair): whole attention heads and whole
    feed-forward neurons are removed, so every Linear involved becomes physically smaller.

    heads: fraction of attention heads removed in every attention layer (at least one head stays).
    ffn: fraction of feed-forward (intermediate) neurons removed in every layer.
    Importance is the L2 norm of what a head or neuron owns: a head's query/key/value rows and its
    output-projection columns; a neuron's intermediate row and output column. The lowest go.
    recovery: `RecoveryConfig` (default "none"; training needs a classification task, an embedding
        encoder is pruned without recovery).
    """

    technique: ClassVar[str] = "prune_heads"
    legacy_recovery_keys: ClassVar = PRUNE_KEYS

    heads: float = Field(0.5, ge=0.0, lt=1.0)
    ffn: float = Field(0.0, ge=0.0, lt=1.0)
    recovery: RecoveryConfig = recovery_field("none", epochs=0, lr=1e-4)
    seed: int = 0

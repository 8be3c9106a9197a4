"""Configuration of low-rank factorization (`slimkit.factorize`)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from slimkit.core.recovery import LAYER_SWAP_KEYS, RecoveringConfig, RecoveryConfig, recovery_field
from slimkit.core.selector import Selector


class LowRankConfig(RecoveringConfig):
    """How to factorize Linear and Conv2d layers.

    rank_selection:
      "energy"      smallest rank keeping `energy` of the squared singular values (per mode for Tucker-2);
      "ratio"       largest rank whose factors hold at most `param_ratio` of the layer's parameters;
      "vbmf"        rank estimated by empirical variational Bayesian matrix factorization (Nakajima 2013);
      "sensitivity" per layer, the smallest candidate rank whose factorization alone costs at most
                    `max_accuracy_drop` validation accuracy (needs a task);
      "fixed"       `rank` for every layer.
    ranks: per-layer ranks by module name (override the rule above; an int, or [out, in] for Tucker-2).
    conv_method: "tucker2" (1x1 -> kxk core -> 1x1), "channel" (kxk with r outputs -> 1x1),
      "spatial" (kx1 -> 1xk) or "none" (leave convolutions alone). 1x1 convolutions always use the
      matrix SVD ("channel").
    only_if_smaller: leave a layer alone (and report it) when its factors would not have fewer
      parameters and MACs than the layer; False forces the factorization (e.g. to check full rank).
    data_aware: factor each Linear / matrix-SVD convolution along the principal directions of its
      responses on `calibration_samples` task inputs (Zhang et al. 2016) instead of its weights'
      SVD; energy then means the fraction of response variance on real data (Tucker-2 and spatial
      SVD ranks stay weight-based). Then, layer by layer, the last factor of every factorized layer
      (a 1x1 conv or Linear; not spatial SVD's 1xk) is refit by least squares on calibration activations so the layer reproduces the original
      output given the already-factorized layers before it. Needs a task.
    recovery: `RecoveryConfig` (default "none"; "distill" learns soft targets from the original model,
        "finetune" the labels; either needs a task).
    """

    technique: ClassVar[str] = "factorize"
    legacy_recovery_keys: ClassVar = LAYER_SWAP_KEYS

    rank_selection: Literal["energy", "ratio", "vbmf", "sensitivity", "fixed"] = "energy"
    energy: float = Field(0.95, gt=0, le=1)
    param_ratio: float = Field(0.5, gt=0, le=1)
    rank: int | None = Field(None, ge=1)
    ranks: dict[str, int | list[int]] = Field(default_factory=dict)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    conv_method: Literal["tucker2", "channel", "spatial", "none"] = "tucker2"
    selector: Selector = Field(default_factory=Selector)
    only_if_smaller: bool = True
    data_aware: bool = False
    calibration_samples: int = Field(512, ge=1)
    recovery: RecoveryConfig = recovery_field("none", epochs=2)

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, ranks: dict[str, int | list[int]]) -> dict[str, int | list[int]]:
        for name, r in ranks.items():
            values = r if isinstance(r, list) else [r]
            if not 1 <= len(values) <= 2 or any(v <= 0 for v in values):
                raise ValueError(f"rank of layer {name!r} must be a positive int or [out, in] pair, got {r!r}")
        return ranks

    @model_validator(mode="after")
    def _fixed_needs_rank(self) -> "LowRankConfig":
        if self.rank_selection == "fixed" and self.rank is None:
            raise ValueError("rank_selection='fixed' needs rank (a positive int)")
        return self

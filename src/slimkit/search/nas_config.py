"""The NAS configuration and result types (`NASConfig`, `SearchResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field

from slimkit.core.config import Config
from slimkit.errors import ConfigError

OBJECTIVES = ("macs", "params", "latency")


class NASConfig(Config):
    """A NAS run. Constraints are hard limits (`max_*`); `objective` is the cost traded against accuracy
    on the Pareto front. `space_options` overrides fields of the space (e.g. {"kernels": [3, 5]})."""

    technique: ClassVar[str | None] = "nas"

    space: Literal["mbconv", "cell"] = "mbconv"
    space_options: dict[str, Any] = Field(default_factory=dict)
    strategy: Literal["random", "evolution", "rl", "gradient"] = "evolution"
    trials: int = Field(20, ge=1)
    # proxy training of each candidate with the shared trainer
    epochs: int = Field(3, ge=1)
    lr: float = Field(2e-3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    train_fraction: float = Field(1.0, gt=0, le=1)
    train_threads: int = Field(1, ge=1)
    # hard constraints; max_macs_ratio is relative to the reference model (the model `apply` gets)
    max_macs: int | None = Field(None, gt=0)
    max_params: int | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    max_macs_ratio: float | None = Field(None, gt=0)
    objective: Literal["macs", "params", "latency"] = "macs"
    # latency lookup table: runtime, threads, batch, statistic; calibration candidates (0: none)
    runtime: Literal["torch", "ort"] = "torch"
    latency_threads: int = Field(1, ge=1)
    latency_batch: int = Field(1, ge=1)
    latency_statistic: Literal["median_ms", "p10_ms"] = "p10_ms"
    latency_runs: int = Field(30, ge=1)
    calibrate_latency: int = Field(3, ge=0)
    latency_rounds: int = Field(3, ge=1)  # interleaved calibration rounds (LatencyTable.measure_rounds)
    # strategy settings
    population: int = Field(10, ge=2)
    sample_size: int = Field(3, ge=1)
    controller_lr: float = Field(0.02, gt=0)
    controller_batch: int = Field(4, ge=1)  # completed trials per REINFORCE step
    controller_advantage: Literal["spread", "rank"] = "spread"  # how trial rewards weight a policy step
    # rl: reward = accuracy - controller_cost_weight * |cost / limit - 1| for the objective's limit (TuNAS)
    controller_cost_weight: float = Field(0.0, ge=0)
    # rl: architectures the controller is rewarded on by a weight-sharing one-shot net before the first
    # trial (ENAS-style; `slimkit.search.warmup`). None: 1024 for the mbconv space, 0 (none) for cell
    controller_warmup: int | None = Field(None, ge=0)
    oneshot_epochs: int = Field(20, ge=1)
    oneshot_lr: float | None = Field(None, gt=0)  # None: `lr`, as the trials (ranks sub-networks best)
    supernet_epochs: int = Field(3, ge=1)
    supernet_max_steps: int | None = Field(None, gt=0)
    final_epochs: int | None = Field(None, ge=1)
    # choosing: the `finalists` most accurate trials are proxy-trained again with `finalist_seeds` fresh
    # seeds and the best mean validation accuracy over those wins (one proxy run's accuracy is noisy, and
    # the most accurate of many is a lucky one; 0: no re-ranking)
    finalists: int = Field(3, ge=0)
    finalist_seeds: int = Field(3, ge=1)
    seed: int = 0
    stale_after_s: float = Field(120.0, gt=0)

    def constraints(self, reference_macs: int | None = None):
        from slimkit.search.cost import Constraints

        max_macs = self.max_macs
        if self.max_macs_ratio is not None:
            if reference_macs is None:
                raise ConfigError("max_macs_ratio needs a reference model (pass one, or use max_macs)")
            ratio_macs = int(self.max_macs_ratio * reference_macs)
            max_macs = ratio_macs if max_macs is None else min(max_macs, ratio_macs)
        return Constraints(max_macs=max_macs, max_params=self.max_params, max_latency_ms=self.max_latency_ms)

    def warmup_samples(self) -> int:
        """Controller warm-up samples this config asks for (rl only)."""
        if self.strategy != "rl":
            return 0
        if self.controller_warmup is None:
            return 1024 if self.space == "mbconv" else 0
        if self.controller_warmup and self.space != "mbconv":
            raise ConfigError("controller_warmup needs the 'mbconv' space (its one-shot net); set it to 0 for 'cell'")
        return self.controller_warmup

    def fingerprint(self) -> dict[str, Any]:
        """The settings a study is bound to (resuming with different ones would mix experiments)."""
        keys = ("space", "space_options", "strategy", "epochs", "lr", "max_steps", "train_fraction", "max_macs",
                "max_params", "max_latency_ms", "max_macs_ratio", "objective", "runtime", "seed", "controller_warmup",
                "oneshot_epochs", "oneshot_lr", "controller_cost_weight")
        return {k: v for k, v in self.to_dict().items() if k in keys}


@dataclass
class SearchResult:
    """What a search produced: every trial as a row, the Pareto front, the chosen row and model."""

    study_name: str
    storage: str
    rows: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    best: dict[str, Any] | None
    model: Any = None
    artifacts: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

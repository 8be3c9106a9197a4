"""One recovery contract for every stage that loses accuracy: `RecoveryConfig` and `recover`.

Pruning (unstructured, structured, heads), factorization, separable conversion and a recipe stage's
`recovery:` block all carry the same `RecoveryConfig` and run it through `recover`:

    PruneConfig(sparsity=0.9, recovery={"method": "distill", "epochs": 8})
    PruneConfig(sparsity=0.9, recovery="distill")      # shorthand: the method, this config's other defaults

Each config keeps its own defaults (pruning fine-tunes for 5 epochs, factorization does not recover
unless asked); a partial mapping or the method alone is completed from them. The flat keys of
earlier releases (`finetune_epochs`, `lr`, `patience`, `augment` on the pruning configs;
`recovery_epochs`, `recovery_lr`, `recovery_patience` on factorize / separable) are still read
(`RecoveringConfig`), so saved files and old recipes load; they are folded into `recovery` and written
back in the new form.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Literal

import torch.nn as nn
from pydantic import Field, model_validator

from slimkit.core.config import Config
from slimkit.core.task import Task
from slimkit.core.trainer import Patience

StepHook = Callable[[nn.Module, int], None]


class RecoveryConfig(Config):
    """How a stage wins back accuracy after it changed the model.

    method: "distill" (soft targets from the model before the stage; temperature / alpha as in
        DistillConfig), "finetune" (the task's own loss) or "none".
    epochs: the most epochs of recovery (0: none). lr: Adam learning rate.
    patience: early stopping on validation accuracy, keeping the best epoch's weights: "auto"
        (max(5, epochs // 3) where the task has a validation split), a number of epochs, or None (off).
    augment: "shift" trains on images shifted by up to 2 pixels (see DistillConfig.augment).
    """

    method: Literal["distill", "finetune", "none"] = "distill"
    epochs: int = Field(2, ge=0)
    lr: float = Field(1e-3, gt=0)
    patience: Patience = "auto"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    augment: Literal["none", "shift"] = "none"

    @property
    def active(self) -> bool:
        """Whether this recovery trains at all."""
        return self.method != "none" and self.epochs > 0


def recovery_field(method: str = "distill", epochs: int = 2, lr: float = 1e-3) -> Any:
    """A config field holding a `RecoveryConfig` with this stage's defaults."""
    return Field(default_factory=lambda: RecoveryConfig(method=method, epochs=epochs, lr=lr))


PRUNE_KEYS = {"finetune_epochs": "epochs", "lr": "lr", "patience": "patience", "augment": "augment"}
LAYER_SWAP_KEYS = {"recovery_epochs": "epochs", "recovery_lr": "lr", "recovery_patience": "patience"}


class RecoveringConfig(Config):
    """Base of the configs of stages that recover: a `recovery: RecoveryConfig` field (declared by the
    subclass with `recovery_field(...)`, its defaults) that also takes the method alone, a partial
    mapping, or the flat keys named in `legacy_recovery_keys`."""

    legacy_recovery_keys: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _fold_recovery(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        moved = {new: data.pop(old) for old, new in cls.legacy_recovery_keys.items() if old in data}
        given = data.get("recovery")
        if given is None and not moved:
            return data
        if isinstance(given, str):
            given = {"method": given}
        elif isinstance(given, RecoveryConfig):
            given = given.to_dict()
        if given is not None and not isinstance(given, Mapping):
            return data  # pydantic reports the wrong type
        default = cls.model_fields["recovery"].default_factory().to_dict()
        data["recovery"] = {**default, **moved, **(given or {})}
        return data


def recover(model: nn.Module, teacher: nn.Module, task: Task, recovery: RecoveryConfig, *, description: str,
            seed: int = 0, on_step: StepHook | None = None, epochs: int | None = None,
            patience: Patience | Literal["config"] = "config") -> nn.Module:
    """Run `recovery` on `model` (distilling from `teacher`, or fine-tuning on the task); returns a new
    model, or `model` itself when the recovery does not train. `epochs` / `patience` override the
    config's (an iterative schedule splits the epochs; a gradual one turns early stopping off)."""
    from slimkit.distill.recovery import finetune
    from slimkit.distill.recovery import recover as distill_recover

    epochs = recovery.epochs if epochs is None else epochs
    if recovery.method == "none" or epochs <= 0 or not any(p.requires_grad for p in model.parameters()):
        return model
    kw = {"epochs": epochs, "lr": recovery.lr, "seed": seed, "on_step": on_step, "description": description,
          "augment": recovery.augment, "patience": recovery.patience if patience == "config" else patience}
    if recovery.method == "distill":
        return distill_recover(model, teacher, task, temperature=recovery.temperature, alpha=recovery.alpha, **kw)
    return finetune(model, task, **kw)


def keep_zeros(model: nn.Module) -> StepHook:
    """An `on_step` hook that holds every weight that is exactly zero now at zero: recovery training must
    not undo pruning (a pruned weight that drifts back is a model that is no longer sparse)."""
    import torch

    masks = {name: p.detach() != 0 for name, p in model.named_parameters() if p.dim() > 1 and (p == 0).any()}

    def hook(m: nn.Module, step: int) -> None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name in masks:
                    p.mul_(masks[name].to(p.device))

    return hook


def recovery_note(model: nn.Module, stage: str) -> list[str]:
    """[one line on what `stage`'s recovery ran and which epoch it kept] when it stopped early or kept an
    earlier epoch than the last; [] otherwise (or without a recovery)."""
    info = getattr(model, "slimkit_recovery", None)
    if not info or info["model"] != id(model):  # none, or a copy carrying an earlier recovery's record
        return []
    if not info["patience"] or info["best_epoch"] is None:
        return []
    if info["ran"] == info["epochs"] and info["best_epoch"] == info["ran"]:
        return []
    stopped = f"stopped after {info['ran']} of {info['epochs']} epochs" if info["ran"] < info["epochs"] \
        else f"ran {info['ran']} epochs"
    return [f"{stage} recovery ({info['method']}) {stopped} and kept the best validation epoch, "
            f"{info['best_epoch']} (early stopping, patience {info['patience']})"]

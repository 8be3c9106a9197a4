"""Recovery of a compressed model by distillation from the original (the teacher).

Every technique that loses accuracy (pruning, factorization, separable conversion, QAT) offers
`recovery="distill"`, which calls `recover` here; `recovery="finetune"` calls the plain trainer.
Neither records a stage: recovery is part of the stage that called it. With `patience` (a number or
"auto", see `slimkit.core.trainer.auto_patience`) they stop on validation accuracy and keep the best
epoch; what ran is left on the returned model as `slimkit_recovery`, and `slimkit.core.recovery.recovery_note`
says it. Stages call them through `slimkit.core.recovery.recover` with their `RecoveryConfig`.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from slimkit.core.task import Task
from slimkit.core.trainer import Patience, TrainConfig, auto_patience, fit

StepHook = Callable[[nn.Module, int], None]


def recover(student: nn.Module, teacher: nn.Module, task: Task, *, epochs: int = 2, lr: float = 1e-3,
            temperature: float = 4.0, alpha: float = 0.9, seed: int = 0, device: str = "auto",
            on_step: StepHook | None = None, description: str = "recover (KD)", on_epoch: StepHook | None = None,
            teacher_device: str | None = None, cache_teacher: bool = False, features: list | None = None,
            optimizer: str = "adam", weight_decay: float = 0.0, batch_size: int | None = None,
            augment: str = "none", max_shift: int = 2, patience: Patience = None) -> nn.Module:
    """Fine-tune `student` with soft targets from the frozen `teacher`; returns a new model.

    Neither model is modified (the teacher runs from its own eval-mode copy). `on_step(model, step)`
    runs after every optimizer step, e.g. to re-apply pruning masks. `features` takes `FeatureLink`s
    (or dicts) for hint / attention losses; `augment="shift"` trains on shifted images (the teacher's
    cache is then off); `patience` stops early on validation accuracy and keeps the best epoch; see
    `DistillConfig` for the other options.
    """
    from slimkit.distill.apply import train_student
    from slimkit.distill.config import DistillConfig

    config = DistillConfig(epochs=epochs, lr=lr, temperature=temperature, alpha=alpha, seed=seed, device=device,
                           teacher_device=teacher_device, cache_teacher=cache_teacher and augment == "none",
                           features=list(features or []), optimizer=optimizer, weight_decay=weight_decay,
                           batch_size=batch_size, augment=augment, max_shift=max_shift, patience=patience)
    model, info = train_student(student, teacher, task, config, on_step=on_step, on_epoch=on_epoch,
                                description=description)
    model.slimkit_recovery = {"model": id(model), "method": "distill", "epochs": epochs, "ran": len(info["history"]),
                              "patience": info["patience"], "best_epoch": info["best_epoch"]}
    return model


def finetune(model: nn.Module, task: Task, *, epochs: int = 2, lr: float = 1e-3, seed: int = 0,
             device: str = "auto", on_step: StepHook | None = None, description: str = "fine-tune",
             on_epoch: StepHook | None = None, optimizer: str = "adam", weight_decay: float = 0.0,
             batch_size: int | None = None, augment: str = "none", max_shift: int = 2,
             patience: Patience = None) -> nn.Module:
    """Plain fine-tuning on the task's loss (the alternative to `recover`); returns a new model.
    `augment="shift"` trains on images shifted by up to `max_shift` pixels; `patience` as in `recover`."""
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device, optimizer=optimizer,
                      weight_decay=weight_decay, batch_size=batch_size,
                      patience=auto_patience(patience, epochs, task))
    result = fit(model, task, cfg, loss=_shifted_loss(task, max_shift) if augment == "shift" else None, on_step=on_step, on_epoch=on_epoch, description=description)
    result.model.slimkit_recovery = {"model": id(result.model), "method": "finetune", "epochs": epochs,
                                     "ran": len(result.history),
                                     "patience": cfg.patience, "best_epoch": result.best_epoch}
    return result.model


def _shifted_loss(task: Task, max_shift: int):
    """The task's loss on images shifted by up to `max_shift` pixels."""
    from slimkit.distill.augment import random_shift

    def loss(m: nn.Module, x, y):
        return task.loss(m(random_shift(x, max_shift)), y)
    return loss

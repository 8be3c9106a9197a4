"""Recovery of a compressed model by distillation from the original (the teacher).

Every technique that loses accuracy (pruning, factorization, separable conversion, QAT) offers
`recovery="distill"`, which calls `recover` here; `recovery="finetune"` calls the plain trainer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.core.task import Task
from slimkit.core.trainer import TrainConfig, fit
from slimkit.distill.losses import soft_target_loss


def recover(student: nn.Module, teacher: nn.Module, task: Task, *, epochs: int = 2, lr: float = 1e-3,
            temperature: float = 4.0, alpha: float = 0.9, seed: int = 0, device: str = "auto",
            on_step=None, description: str = "recover (KD)") -> nn.Module:
    """Fine-tune `student` with soft targets from frozen `teacher`; returns a new model."""
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_dev = next((p.device for p in teacher.parameters()), x.device)
        with torch.no_grad():
            t_logits = teacher(x.to(t_dev)).to(x.device)
        return soft_target_loss(model(x), t_logits, y, temperature=temperature, alpha=alpha)

    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device)
    return fit(student, task, cfg, loss=loss, on_step=on_step, description=description).model


def finetune(model: nn.Module, task: Task, *, epochs: int = 2, lr: float = 1e-3, seed: int = 0,
             device: str = "auto", on_step=None, description: str = "fine-tune") -> nn.Module:
    """Plain fine-tuning on the task's loss (the alternative to `recover`)."""
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device)
    return fit(model, task, cfg, on_step=on_step, description=description).model

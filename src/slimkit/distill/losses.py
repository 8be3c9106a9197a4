"""Distillation losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None, *,
                     temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton et al. (2015): alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones.
    With targets=None (no labels) the loss is the soft term alone.
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  log_target=True, reduction="batchmean")
    soft = kl * (t * t)
    if targets is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015): mean squared error between the (adapted) student
    feature and the teacher feature, which must have the same shape."""
    return F.mse_loss(student_feature, teacher_feature)


def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention of a conv feature map (N, C, H, W): sum_c |A_c|^p, flattened to (N, H*W)
    and L2-normalized per example (Zagoruyko & Komodakis 2017)."""
    return F.normalize(feature.abs().pow(p).sum(dim=1).flatten(1), dim=1)


def attention_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Attention transfer: mean over the batch of ||Q_s - Q_t||_2 between normalized attention maps.

    Channel counts may differ; a student map of another spatial size is average-pooled (or
    bilinearly resized, if smaller) to the teacher's size first.
    """
    if student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        size = teacher_feature.shape[-2:]
        if student_feature.shape[-2] >= size[0] and student_feature.shape[-1] >= size[1]:
            student_feature = F.adaptive_avg_pool2d(student_feature, size)
        else:
            student_feature = F.interpolate(student_feature, size=size, mode="bilinear", align_corners=False)
    diff = attention_map(student_feature, p) - attention_map(teacher_feature, p)
    return diff.norm(dim=1).mean()

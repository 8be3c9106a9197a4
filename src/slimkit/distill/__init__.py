"""Knowledge distillation: soft targets, and recovery of compressed models from the original."""
from slimkit.distill.losses import soft_target_loss
from slimkit.distill.recovery import finetune, recover

__all__ = ["soft_target_loss", "recover", "finetune"]

"""Efficient-architecture conversion: standard kxk convolutions -> depthwise-separable
(MobileNetV1) or inverted-residual (MobileNetV2) blocks, recovered by distillation.

    mobile = slimkit.separable(model, slimkit.SeparableConfig(), task=task)
"""
from slimkit.arch.apply import conversion_report, separable
from slimkit.arch.config import SeparableConfig

__all__ = ["separable", "SeparableConfig", "conversion_report"]

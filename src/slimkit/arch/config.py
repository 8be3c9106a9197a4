"""Configuration of depthwise-separable conversion (`slimkit.separable`)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from slimkit.core.recovery import LAYER_SWAP_KEYS, RecoveringConfig, RecoveryConfig, recovery_field
from slimkit.core.selector import Selector


class SeparableConfig(RecoveringConfig):
    """How to rewrite standard kxk convolutions into MobileNet-style blocks.

    block: "separable" (depthwise kxk -> pointwise 1x1, MobileNetV1) or "inverted_residual"
      (1x1 expand -> ReLU6 -> depthwise kxk -> ReLU6 -> 1x1 project, with a residual when shapes
      allow; MobileNetV2).
    depth_multiplier: depthwise outputs per input channel of a "separable" block.
    expansion: hidden channels per input channel of an "inverted_residual" block (>= 2: the
      initialization uses +/- pairs of channels to pass signed values through ReLU6).
    min_in_channels: layers with fewer input channels keep their standard convolution (MobileNets
      keep a full convolution on the image itself); they are reported as skipped.
    init: "least_squares" (depthwise kernels from a per-channel SVD of the original kernel, then the
      1x1 projection and bias solved by least squares on calibration activations, layer by layer)
      or "svd" (data-free: the per-channel SVD alone).
    calibration_samples: images used for the least-squares fit. ridge: relative Tikhonov term.
    only_if_smaller: leave a layer alone (and report it) when the block would not have fewer
      parameters and MACs than the convolution.
    recovery: `RecoveryConfig` (default: distill from the original model, at most 2 epochs,
        early-stopped on validation).
    """

    technique: ClassVar[str] = "separable"
    legacy_recovery_keys: ClassVar = LAYER_SWAP_KEYS

    block: Literal["separable", "inverted_residual"] = "separable"
    depth_multiplier: int = Field(1, ge=1)
    expansion: int = Field(2, ge=2)
    selector: Selector = Field(default_factory=Selector)
    min_in_channels: int = Field(4, ge=1)
    init: Literal["least_squares", "svd"] = "least_squares"
    calibration_samples: int = Field(256, ge=1)
    ridge: float = Field(1e-4, ge=0)
    only_if_smaller: bool = True
    recovery: RecoveryConfig = recovery_field("distill", epochs=2)

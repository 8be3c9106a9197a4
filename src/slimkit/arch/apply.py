"""`slimkit.separable`: rewrite standard convolutions into depthwise-separable (MobileNetV1) or
inverted-residual (MobileNetV2) blocks, initialized to approximate the original layer, then
recovered by distillation from the original model.

    mobile = slimkit.separable(model, slimkit.SeparableConfig(), task=task)

Initialization, layer by layer in model order:
1. data-free: each input channel's slice of the kernel, W[:, i] (Cout x k*k), is split by SVD into
   k*k depthwise kernels and pointwise columns (the best separable approximation per channel);
2. least squares: with the depthwise part fixed, the 1x1 projection and its bias are solved on
   calibration activations so that the block reproduces the original layer's output. The block's
   inputs come from the already-converted model, so each fit also absorbs the error of the layers
   converted before it (as in channel-pruning reconstruction).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slimkit.arch.config import SeparableConfig
from slimkit.arch.modules import BLOCKS, DepthwiseSeparableConv, InvertedResidualConv
from slimkit.core import registry
from slimkit.core.layers import pair
from slimkit.core.progress import progress_bar
from slimkit.core.registry import Technique, chained
from slimkit.core.selector import select, set_submodule
from slimkit.core.state import copy_model
from slimkit.core.swap import SwapPlan, exact_names, restore_swaps, swap_report
from slimkit.core.task import Task
from slimkit.errors import ConfigError
from slimkit.lowrank.refit import refit_last_layer


def unsupported_reason(layer: nn.Module, config: SeparableConfig) -> str | None:
    """Why `layer` cannot be converted (None if it can)."""
    if not isinstance(layer, nn.Conv2d):
        return f"{type(layer).__name__} is not a Conv2d"
    if type(layer).forward is not nn.Conv2d.forward:
        return f"{type(layer).__name__} has its own forward (e.g. custom padding) that a block would not reproduce"
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups}) is already cheaper than a separable block"
    if pair(layer.kernel_size) == (1, 1):
        return "1x1 convolution: no spatial part to separate"
    if layer.in_channels < config.min_in_channels:
        return (f"{layer.in_channels} input channel(s) < min_in_channels={config.min_in_channels} "
                "(MobileNets keep a full convolution on the image)")
    return None


def _width(config: SeparableConfig) -> int:
    return config.depth_multiplier if config.block == "separable" else config.expansion


def block_cost(conv: nn.Conv2d, config: SeparableConfig | None = None, block: str | None = None,
               width: int | None = None) -> tuple[int, int]:
    """(parameters, MACs per output pixel) of `conv` (config None) or of the block replacing it."""
    cout, cin = conv.out_channels, conv.in_channels
    (kh, kw), (sh, sw) = pair(conv.kernel_size), pair(conv.stride)
    if config is None and block is None:
        w = cout * cin // conv.groups * kh * kw
        return w + (0 if conv.bias is None else cout), w
    block = block or config.block
    hidden = cin * (width or _width(config))
    if block == "separable":
        w = hidden * kh * kw + hidden * cout
        return w + cout, w
    # the expansion 1x1 runs at the input resolution
    return cin * hidden + hidden * kh * kw + hidden * cout + cout, \
        cin * hidden * sh * sw + hidden * kh * kw + hidden * cout


@torch.no_grad()
def svd_init(conv: nn.Conv2d, block: nn.Module) -> nn.Module:
    """Data-free initialization: per input channel, W[:, i] ~= sum_j u_j s_j v_j^T, with v_j as
    depthwise kernels and u_j as pointwise columns (sqrt(s_j) on each side)."""
    from slimkit.lowrank.decompose import single_threaded_blas

    w = conv.weight.detach().to(torch.float64).cpu()
    cout, cin, kh, kw = w.shape
    per_channel = w.transpose(0, 1).reshape(cin, cout, kh * kw).numpy()
    with single_threaded_blas():
        u, s, vh = np.linalg.svd(per_channel, full_matrices=False)  # (cin, cout, q), (cin, q), (cin, q, k*k)
    u, s, vh = torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)
    q = s.shape[1]
    root = s.sqrt()
    dw = torch.zeros(block.depthwise.weight.shape, dtype=torch.float64)
    proj = torch.zeros(block.projection.weight.shape[:2], dtype=torch.float64)
    if isinstance(block, DepthwiseSeparableConv):
        m = block.multiplier
        for j in range(min(m, q)):
            idx = torch.arange(cin) * m + j  # depthwise output channels of group i are i*m .. i*m+m-1
            dw[idx, 0] = (root[:, j, None] * vh[:, j]).reshape(cin, kh, kw)
            proj[:, idx] = (u[:, :, j] * root[:, j, None]).T
    else:
        t = block.expansion
        expand = torch.zeros(block.expand.weight.shape[:2], dtype=torch.float64)
        for c in range(t):
            # hidden channels come in +/- pairs: relu6(z) - relu6(-z) = z for |z| < 6, so the pair
            # carries the signed depthwise output through both ReLU6s
            j, sign = c // 2, (1.0 if c % 2 == 0 else -1.0)
            idx = torch.arange(cin) * t + c
            expand[idx, torch.arange(cin)] = 1.0
            if j >= q:
                continue
            dw[idx, 0] = sign * (root[:, j, None] * vh[:, j]).reshape(cin, kh, kw)
            proj[:, idx] = sign * (u[:, :, j] * root[:, j, None]).T
        block.expand.weight.copy_(expand[:, :, None, None].to(block.expand.weight.dtype))
    block.depthwise.weight.copy_(dw.to(block.depthwise.weight.dtype))
    block.projection.weight.copy_(proj[:, :, None, None].to(block.projection.weight.dtype))
    block.projection.bias.copy_(conv.bias.detach() if conv.bias is not None else torch.zeros(cout))
    return block


def fit_projection(original: nn.Module, original_layer: nn.Module, converted: nn.Module, block: nn.Module,
                   task: Task, config: SeparableConfig) -> float:
    """Solve the block's 1x1 projection + bias by ridge least squares so that its output matches
    `original_layer`'s output on calibration images; returns the relative residual error."""
    residual = isinstance(block, InvertedResidualConv) and block.use_residual
    return refit_last_layer(original, original_layer, converted, block, block.projection, task,
                            samples=config.calibration_samples, ridge=config.ridge, residual=residual)


@chained("separable")
def separable(model: nn.Module, config: SeparableConfig | None = None, *, task: Task | None = None) -> nn.Module:
    """Return a copy of `model` whose selected kxk convolutions are MobileNet-style blocks.

    model: a trained model (not modified). config: `SeparableConfig`. task: calibration data for
    the least-squares initialization and training data for recovery (required unless
    init="svd" and recovery="none"). Converted and skipped layers are recorded in the stage
    structure and as notes on the model.
    """
    config = config or SeparableConfig()
    if task is None and (config.init == "least_squares" or config.recovery.active):
        raise ConfigError("SeparableConfig: init='least_squares' and recovery need a task "
                          "(pass task=..., or use init='svd', recovery='none')")
    new = copy_model(model)
    teacher = copy_model(model).eval()  # the reference outputs; the user's model keeps its mode
    teacher_layers = dict(teacher.named_modules())
    selected = select(new, config.selector, default_types=(nn.Conv2d,), what="separable")
    plan = SwapPlan("separable", "convert", exact_names(config.selector))
    was_training = new.training
    new.eval()
    with progress_bar("separable: convert", len(selected)) as advance:
        for name, layer in selected:
            advance(1)
            reason = unsupported = unsupported_reason(layer, config)
            if reason is None and config.only_if_smaller:
                p0, m0 = block_cost(layer)
                p1, m1 = block_cost(layer, config)
                if not (p1 < p0 and m1 < m0):
                    reason = f"{config.block} block would not be smaller ({p1:,} vs {p0:,} params, {m1:,} vs {m0:,} MACs)"
            if reason is not None:
                plan.skip(name, reason, unsupported=unsupported is not None)
                continue
            block = svd_init(layer, BLOCKS[config.block].like(layer, _width(config)))
            block.eval()
            set_submodule(new, name, block)
            info: dict[str, Any] = {"block": config.block, "width": _width(config),
                                    "params_before": block_cost(layer)[0], "params_after": block_cost(layer, config)[0],
                                    "macs_before": block_cost(layer)[1], "macs_after": block_cost(layer, config)[1]}
            if config.init == "least_squares":
                info["relative_error"] = round(fit_projection(teacher, teacher_layers[name], new, block, task, config), 6)
            plan.layers[name] = info
    new.train(was_training)
    return plan.finish(new, model, config, task, teacher=teacher, done="convolution(s) converted", line=_line)


def _line(info: dict[str, Any]) -> str:
    return f"{info['block']} (width {info['width']})" + (
        f", least-squares relative error {info['relative_error']:.4f}" if "relative_error" in info else "")


def conversion_report(model: nn.Module) -> dict[str, Any]:
    """The structure of the last separable stage applied to `model` ({"layers": ..., "skipped": ...})."""
    return swap_report(model, "separable")


def restore(model: nn.Module, config: SeparableConfig, structure: dict[str, Any]) -> nn.Module:
    """Rebuild the converted architecture on a freshly built model (weights are loaded afterwards)."""
    return restore_swaps(model, structure, "separable", BLOCKS, "block",
                         lambda cls, layer, info: cls.like(layer, info["width"]))


def _demo(model: nn.Module, task: Task) -> SeparableConfig:
    return SeparableConfig(recovery={"method": "distill", "epochs": 2})


registry.register(Technique(
    name="separable", family="arch", config_cls=SeparableConfig, apply=separable, restore=restore, demo=_demo,
    summary="depthwise-separable / inverted-residual conversion of kxk convolutions, least-squares init, KD recovery",
    order=35))

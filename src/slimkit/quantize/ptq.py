"""Post-training quantization steps: activation calibration, cross-layer equalization, bias
correction, learned rounding (AdaRound) and second-order rounding (GPTQ). Statistics passes never
change the model; the transformations use the statistics they are given."""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core import distributed
from slimkit.core.progress import progress_bar
from slimkit.errors import CalibrationError, ConfigError
from slimkit.quantize.calibration import TensorStats, merge_stats, thresholds
from slimkit.quantize.equalize import equalize  # noqa: F401  (ptq.equalize: one of the PTQ steps)
from slimkit.quantize.graph import act_quantizers, weight_layers
from slimkit.quantize.modules import ActQuant, QuantWeightLayer, conv_forward, real_tokens


def call_model(model: nn.Module, batch):
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def check_batch(batch, index: int) -> None:
    tensors = batch if isinstance(batch, (tuple, list)) else (batch,)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError(f"calibration batch {index} contains NaN or Inf values; clean the calibration data")


def token_mask(batch) -> torch.Tensor | None:
    """The attention mask of an (input_ids, attention_mask, ...) batch as a (B, T) bool tensor, else None:
    the second element must be a 0/1 integer tensor of the first's 2-D shape with a real token in every
    row (an all-zero token_type_ids is not a mask)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    ids, mask = batch[0], batch[1]
    if not (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.dim() == 2
            and mask.shape == ids.shape and not mask.is_floating_point()):
        return None
    return mask.bool() if bool(((mask == 0) | (mask == 1)).all() and mask.any(1).all()) else None


@torch.no_grad()
def run_batches(model: nn.Module, batches: list, description: str, on_batch=None, progress: bool = True) -> int:
    """Forward every batch (eval mode); returns the number of samples. Raises on an empty set or a
    batch with NaN/Inf. on_batch(batch) is called before each forward."""
    model.eval()
    n = 0
    with progress_bar(description, len(batches) if progress else 0) as advance:
        for i, batch in enumerate(batches):
            check_batch(batch, i)
            if on_batch is not None:
                on_batch(batch)
            call_model(model, batch)
            n += (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]
            advance(1)
    if n == 0:
        raise CalibrationError("the calibration set is empty: give at least one sample (task.calibration or "
                               "calibration_data)")
    return n


def collect_activation_stats(model: nn.Module, batches: list) -> dict[str, object]:
    """One pass with float weights and every activation quantizer passing its input through; returns
    name -> statistics of what each quantizer saw (token batches: real tokens only). Under torchrun each
    rank runs a block of the batches and the blocks' statistics are merged (`merge_stats`)."""
    batches, split = distributed.block_shard(batches)
    quantizers = act_quantizers(model)
    layers = weight_layers(model).values()
    stats: dict[str, TensorStats] = {}
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.mode = "off"
    for layer in layers:
        layer.enabled = False
    try:
        observe_layers(model, {q.name: q for q in quantizers}, batches, "calibrate",
                        lambda name, q, x: stats.setdefault(name, TensorStats(name)).update(x), outputs=True)
    finally:
        for layer in layers:
            layer.enabled = True
        for q, mode in zip(quantizers, modes):
            q.mode = mode
    if split:
        stats = merge_stats(distributed.all_gather_objects(stats))
    for q in quantizers:
        if q.name not in stats:
            raise CalibrationError(f"activation {q.name!r} saw no data during calibration (the layer never ran)")
    return stats


def apply_activation_thresholds(model: nn.Module, stats: dict, method: str, percentile: float) -> None:
    for q in act_quantizers(model):
        lo, hi = thresholds(stats[q.name], method, q.spec, percentile=percentile)
        q.set_range(lo, hi)


def _layer_input(layer: QuantWeightLayer, x: torch.Tensor) -> torch.Tensor:
    """What `layer` multiplies its weight with: its input after its own input quantizer, if it has one."""
    return layer.input_owned(x) if layer.input_owned is not None else x


def _real_tokens(layer: QuantWeightLayer | ActQuant, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear layer's or an activation quantizer's (B, T, D) tensor at the batch's real tokens, as
    (n, D); else x."""
    return real_tokens(x, mask) if isinstance(layer, ActQuant) or isinstance(layer.layer, nn.Linear) else x


def observe_layers(model: nn.Module, layers: dict[str, QuantWeightLayer | ActQuant], batches: list,
                    description: str, observe, *, outputs: bool = False, progress: bool = True) -> None:
    """One pass over `batches`, calling observe(name, layer, x) with the input each of `layers` multiplies
    its weight with (`outputs`: with its output instead; an activation quantizer's, when it is off, is
    the tensor it sees). Token batches (input_ids, attention_mask): a Linear layer's or quantizer's
    (B, T, D) tensor is reduced to its (n, D) rows at real tokens, so padding never enters the
    statistics."""
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        if outputs:
            return lambda mod, args, out: observe(name, mod, _real_tokens(mod, out, current["mask"]))
        return lambda mod, args: observe(name, mod, _real_tokens(mod, _layer_input(mod, args[0]), current["mask"]))

    register = "register_forward_hook" if outputs else "register_forward_pre_hook"
    handles = [getattr(layer, register)(hook(name)) for name, layer in layers.items()]
    try:
        run_batches(model, batches, description, on_batch=lambda b: current.update(mask=token_mask(b)),
                    progress=progress)
    finally:
        for h in handles:
            h.remove()


# -- bias correction ------------------------------------------------------------------------
def _float_and_quant_outputs(layer: QuantWeightLayer, x: torch.Tensor, wf: torch.Tensor | None = None):
    wf = layer.layer.weight if wf is None else wf
    wq = layer.quantized_weight()
    bias = layer.layer.bias
    if isinstance(layer.layer, nn.Linear):
        return F.linear(x, wf, bias), F.linear(x, wq, bias)
    return conv_forward(layer.layer, x, wf, bias), conv_forward(layer.layer, x, wq, bias)


@torch.no_grad()
def bias_correction(model: nn.Module, batches: list,
                    float_weights: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Empirical bias correction: add E[W x - Q(W) x] per output channel to each layer's bias,
    measured on the calibration inputs each layer sees. Returns the mean |correction| per layer.
    `float_weights` (name -> W): the float weights when the layers' own were already replaced by their
    quantized values (AdaRound bakes its rounding into them)."""
    float_weights = float_weights or {}
    layers = weight_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, layer: QuantWeightLayer, x: torch.Tensor) -> None:
        yf, yq = _float_and_quant_outputs(layer, x, float_weights.get(name))
        if isinstance(layer.layer, nn.Linear):  # features last: (..., out)
            diff = (yf - yq).reshape(-1, yf.shape[-1]).transpose(0, 1)
        else:  # channels second: (N, C, ...)
            diff = (yf - yq).transpose(0, 1).reshape(yf.shape[1], -1)
        sums[name] = sums.get(name, 0) + diff.sum(1)
        counts[name] = counts.get(name, 0) + diff.shape[1]

    observe_layers(model, {n: m for n, m in layers.items() if not m.dynamic}, batches, "bias correction", observe)
    corrections = {}
    for name, total in sums.items():
        layer = layers[name].layer
        delta = total / counts[name]
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        layer.bias.add_(delta)
        corrections[name] = float(delta.abs().mean())
    return corrections


# -- AdaRound ----------------------------------------------------------------------------------
_ZETA, _GAMMA = 1.1, -0.1


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


@torch.no_grad()
def _layer_io(model: nn.Module, float_model: nn.Module, name: str, batches: list):
    """Inputs of layer `name` in the (partly) quantized model and its outputs in the float model
    (token batches: at real tokens only, so batches of different lengths concatenate)."""
    xs, ys = [], []  # the same batches in the same order through both models: xs[i] and ys[i] belong together
    observe_layers(model, {name: model.get_submodule(name)}, batches, f"{name}: inputs",
                    lambda n, m, x: xs.append(x), progress=False)
    observe_layers(float_model, {name: float_model.get_submodule(name)}, batches, f"{name}: float outputs",
                    lambda n, m, y: ys.append(y), outputs=True, progress=False)
    return torch.cat(xs), torch.cat(ys)


def adaround(model: nn.Module, batches: list, *, iters: int = 1000, reg: float = 0.01, batch_size: int = 32,
             lr: float = 1e-2, seed: int = 0, layers: list[str] | None = None) -> dict[str, float]:
    """Learned rounding (Nagel et al. 2020), layer by layer in model order: choose floor or ceil for
    every weight to minimize the layer's output error against the float model on calibration data.
    `layers`: fnmatch patterns of the layers to round this way (default all; the rest keep nearest
    rounding). Returns the final reconstruction MSE per layer."""
    patterns = layers
    layers = {n: m for n, m in weight_layers(model).items()
              if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not layers:
        raise ConfigError("adaround: no quantized layer matches adaround_layers")
    float_model = _float_copy(model)
    gen = torch.Generator().manual_seed(seed)
    results = {}
    with progress_bar("adaround", len(layers) * iters) as advance:
        for name, layer in layers.items():
            if layer.dynamic or layer.spec.granularity == "group":
                continue
            x, y = _layer_io(model, float_model, name, batches)
            w = layer.layer.weight.detach()
            s = layer.weight_scale.detach()
            s_b = s.reshape(-1, *[1] * (w.dim() - 1)) if s.dim() else s
            rest = (w / s_b - torch.floor(w / s_b)).clamp(0.01, 0.99)
            v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))
            opt = torch.optim.Adam([v], lr=lr)
            warmup = int(0.2 * iters)
            grad_ctx = torch.enable_grad()  # callers may be inside no_grad; rounding is learned
            grad_ctx.__enter__()
            for it in range(iters):
                idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)
                layer.round_offset = _rectified_sigmoid(v)
                out = _forward_layer(layer, x[idx])
                # squared error summed over the output features (channels of a conv, last axis of a Linear)
                rec = (out - y[idx]).pow(2).sum(-1 if isinstance(layer.layer, nn.Linear) else 1).mean()
                if it < warmup:
                    loss = rec
                else:
                    beta = 20 - (20 - 2) * (it - warmup) / max(iters - warmup, 1)
                    h = _rectified_sigmoid(v)
                    loss = rec + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if it % 50 == 0:
                    advance(50 if it + 50 <= iters else iters - it, layer=name, rec=float(rec.detach()))
            grad_ctx.__exit__(None, None, None)
            with torch.no_grad():  # bake the hard decision: weights sit exactly on the chosen grid point
                layer.round_offset = (_rectified_sigmoid(v) >= 0.5).float()
                layer.layer.weight.copy_(layer.quantized_weight())
                layer.round_offset = None
                results[name] = float((_forward_layer(layer, x) - y).pow(2).mean())
    return results


def _forward_layer(layer: QuantWeightLayer, x: torch.Tensor) -> torch.Tensor:
    w = layer.quantized_weight()
    b = layer.quantized_bias()
    if isinstance(layer.layer, nn.Linear):
        return F.linear(x, w, b)
    return conv_forward(layer.layer, x, w, b)


def _float_copy(model: nn.Module) -> nn.Module:
    import copy

    from slimkit.quantize.modules import ActQuant

    float_model = copy.deepcopy(model)
    for m in float_model.modules():
        if isinstance(m, ActQuant):
            m.mode = "off"
        if isinstance(m, QuantWeightLayer):
            m.enabled = False
    return float_model.eval()


def batches_from(data, *, batch_size: int = 64, max_samples: int | None = None) -> list:
    """A list of input batches from a Task (its calibration split), a tensor, or an iterable of batches."""
    from slimkit.core.task import Task

    if isinstance(data, Task):
        return list(data.calibration_batches(batch_size=batch_size, max_samples=max_samples))
    if isinstance(data, torch.Tensor):
        if max_samples is not None:
            data = data[:max_samples]
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    if isinstance(data, Iterable):
        return list(data)
    raise CalibrationError(f"calibration data must be a Task, a tensor or an iterable of batches, "
                           f"got {type(data).__name__}")

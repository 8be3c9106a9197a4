"""Mixed precision: per-layer sensitivity, then a weight bit-width assignment under a budget.

Sensitivity of a layer = SQNR (dB) of the model's output on a calibration batch when only that
layer's weights are quantized to the lowest candidate bit width (everything else float). Layers are
lowered from the highest candidate, least sensitive first, while the budget allows:
size budget (`size_fraction` of the all-highest weight bits) or accuracy budget
(`max_accuracy_drop` on the validation split, measured after each lowering).
"""
from __future__ import annotations

import copy

import torch

from slimkit.core.selector import select
from slimkit.errors import ConfigError, InfeasibleError
from slimkit.quantize.calibration import weight_thresholds
from slimkit.quantize.numerics import dequantize, qparams, quantize, sqnr_db


def _quantized_weight(w: torch.Tensor, spec, method: str) -> torch.Tensor:
    s, z = qparams(*weight_thresholds(w, method, spec), spec)
    return dequantize(quantize(w, s, z, spec), s, z, spec)


@torch.no_grad()
def layer_sensitivity(model, config, batch, bits: int) -> dict[str, float]:
    """name -> output SQNR (dB) with only that layer's weights at `bits` bits."""
    from slimkit.quantize.apply import _selector
    from slimkit.quantize.graph import QUANTIZABLE

    model = copy.deepcopy(model).eval()
    ref = model(batch)
    spec = config.weight_spec(bits)
    result = {}
    for name, layer in select(model, _selector(config), default_types=QUANTIZABLE, what="quantize"):
        original = layer.weight.detach().clone()
        layer.weight.copy_(_quantized_weight(original, spec, config.weight_calibration))
        result[name] = sqnr_db(ref, model(batch))
        layer.weight.copy_(original)
    return result


def assign_bits(model, config, task, batches) -> tuple[dict[str, int], list[str]]:
    """Per-layer weight bits and a report line per layer saying why."""
    from slimkit.core.trainer import accuracy

    mp = config.mixed_precision
    low, high = min(mp.candidates), max(mp.candidates)
    batch = batches[0]
    sens = layer_sensitivity(model, config, batch, low)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in sens}
    bits = {n: high for n in sens}
    order = sorted(sens, key=lambda n: -sens[n])  # least sensitive (highest SQNR) first
    if mp.size_fraction is not None:
        target = mp.size_fraction * high * sum(sizes.values())
        for name in order:
            if sum(sizes[n] * bits[n] for n in bits) <= target:
                break
            bits[name] = low
        if sum(sizes[n] * bits[n] for n in bits) > target:
            raise InfeasibleError(f"mixed precision: even all layers at {low} bits exceed size_fraction {mp.size_fraction}")
        why = f"size budget {mp.size_fraction:.2f} of {high}-bit weights"
    else:
        if task is None or task.metric != "accuracy":
            raise ConfigError("mixed precision with max_accuracy_drop needs a classification task")
        base = accuracy(model, task, "val")
        trial = copy.deepcopy(model).eval()
        mods = dict(trial.named_modules())
        for name in order:
            w = mods[name].weight
            original = w.detach().clone()
            with torch.no_grad():
                w.copy_(_quantized_weight(original, config.weight_spec(low), config.weight_calibration))
            if base - accuracy(trial, task, "val") <= mp.max_accuracy_drop:
                bits[name] = low
            else:
                with torch.no_grad():
                    w.copy_(original)
        why = f"accuracy budget {100 * mp.max_accuracy_drop:.2f} points"
    report = [f"mixed precision ({why}): " + ", ".join(
        f"{n} {bits[n]}-bit (SQNR at {low} bits {sens[n]:.1f} dB{'; sensitive, kept high' if bits[n] == high else ''})"
        for n in sens)]
    return bits, report

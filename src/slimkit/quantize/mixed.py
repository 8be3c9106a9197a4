"""Mixed precision: per-layer sensitivity, then a weight bit-width assignment under a budget.

Sensitivity of a layer = SQNR (dB) of the model's output on a calibration batch when only that
layer's weights are quantized to a candidate bit width (everything else float), measured at every
candidate. Layers are lowered one candidate at a time from the highest, the step that adds the least
output noise per weight bit saved first, while the budget allows: size budget (`size_fraction` of the
all-highest weight bits) or accuracy budget (`max_accuracy_drop` on the validation split, measured
after each lowering). See `assign_bits`.
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
    from slimkit.quantize.graph import QUANTIZABLE

    model = copy.deepcopy(model).eval()
    ref = model(batch)
    spec = config.weight_spec(bits)
    result = {}
    for name, layer in select(model, config.layer_selector(), default_types=QUANTIZABLE, what="quantize"):
        original = layer.weight.detach().clone()
        layer.weight.copy_(_quantized_weight(original, spec, config.weight_calibration))
        result[name] = sqnr_db(ref, model(batch))
        layer.weight.copy_(original)
    return result


@torch.no_grad()
def output_sqnr(model, config, batch, bits: dict[str, int]) -> float:
    """Output SQNR (dB) with every listed layer's weights at its bit width (activations float)."""
    trial = copy.deepcopy(model).eval()
    for name, b in bits.items():
        w = trial.get_submodule(name).weight
        w.copy_(_quantized_weight(w.detach().clone(), config.weight_spec(b), config.weight_calibration))
    return sqnr_db(model.eval()(batch), trial(batch))


def assign_bits(model, config, task, batches) -> tuple[dict[str, int], list[str]]:
    """Per-layer weight bits and a report line per layer saying why.

    Every layer starts at the highest candidate. A step lowers one layer to its next lower candidate.
    Its cost is the output noise it adds per weight bit it saves, with each layer's noise power read
    from its SQNR when quantized alone (10^(-SQNR/10), noises of different layers taken as additive);
    the cheapest step goes first, until the size budget is met, or, under an accuracy budget, for as
    long as the validation accuracy stays within it (a rejected step freezes that layer where it is).
    """
    import heapq

    from slimkit.core.trainer import accuracy

    mp = config.mixed_precision
    levels = sorted(set(mp.candidates), reverse=True)  # e.g. [8, 6, 4]
    high = levels[0]
    batch = batches[0]
    sens = {b: layer_sensitivity(model, config, batch, b) for b in levels}
    names = list(sens[high])
    sizes = {n: model.get_submodule(n).weight.numel() for n in names}
    bits = {n: high for n in names}

    def total() -> int:
        return sum(sizes[n] * bits[n] for n in bits)

    def cost(name: str, level: int) -> float:  # noise added per bit saved by lowering to levels[level]
        noise = [10 ** (-min(sens[levels[i]][name], 200.0) / 10) for i in (level - 1, level)]
        return (noise[1] - noise[0]) / (sizes[name] * (levels[level - 1] - levels[level]))

    steps = [(cost(n, 1), n, 1) for n in names]  # (cost, name, index of the lower level)
    heapq.heapify(steps)

    def push_next(name: str, level: int) -> None:
        if level + 1 < len(levels):
            heapq.heappush(steps, (cost(name, level + 1), name, level + 1))

    if mp.size_fraction is not None:
        target = mp.size_fraction * high * sum(sizes.values())
        while steps and total() > target:
            _, name, level = heapq.heappop(steps)
            bits[name] = levels[level]
            push_next(name, level)
        if total() > target:
            raise InfeasibleError(f"mixed precision: even all layers at {levels[-1]} bits exceed "
                                  f"size_fraction {mp.size_fraction}")
        greedy = dict(bits)
        # the last step may have overshot the budget: raise layers back one level while it still holds,
        # the raise that removes the most (modelled) noise first
        while True:
            raises = []
            for n in names:
                if bits[n] != high:
                    up = levels.index(bits[n])
                    if total() + sizes[n] * (levels[up - 1] - bits[n]) <= target:
                        raises.append((cost(n, up) * sizes[n] * (levels[up - 1] - bits[n]), n))
            if not raises:
                break
            name = max(raises)[1]
            bits[name] = levels[levels.index(bits[name]) - 1]
        # the noise model is approximate: measure the output SQNR of the greedy assignments and of
        # every uniform width within the budget, and keep the best
        options = [dict(bits), greedy] + [{n: b for n in names} for b in levels
                                          if b * sum(sizes.values()) <= target]
        measured = [output_sqnr(model, config, batch, o) for o in options]
        bits = options[max(range(len(options)), key=measured.__getitem__)]
        why = (f"size budget {mp.size_fraction:.2f} of {high}-bit weights; output SQNR {max(measured):.1f} dB, "
               f"best of {len(options)} assignments measured")
    else:
        if task is None or task.metric != "accuracy":
            raise ConfigError("mixed precision with max_accuracy_drop needs a classification task")
        base = accuracy(model, task, "val")
        trial = copy.deepcopy(model).eval()
        while steps:
            _, name, level = heapq.heappop(steps)
            w = trial.get_submodule(name).weight
            original = w.detach().clone()
            with torch.no_grad():
                w.copy_(_quantized_weight(model.get_submodule(name).weight.detach(),
                                          config.weight_spec(levels[level]), config.weight_calibration))
            if base - accuracy(trial, task, "val") <= mp.max_accuracy_drop:
                bits[name] = levels[level]
                push_next(name, level)
            else:
                with torch.no_grad():
                    w.copy_(original)
        why = f"accuracy budget {100 * mp.max_accuracy_drop:.2f} points"

    def reason(n: str) -> str:
        at = "; ".join(f"SQNR at {b} bits {sens[b][n]:.1f} dB" for b in levels[1:])
        return f"{n} {bits[n]}-bit ({at}{'; sensitive, kept high' if bits[n] == high else ''})"

    report = [f"mixed precision ({why}, candidates {levels}): " + ", ".join(reason(n) for n in names)]
    return bits, report

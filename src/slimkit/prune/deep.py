"""Deep Compression under an accuracy budget: per-layer sparsity and code bits searched on validation.

    small = slimkit.pack(model, "out/model.slim", slimkit.PackConfig(budget=0.3, codebook_epochs=5), task=task)

What is searched, all on the task's validation split (the test split is never looked at):

1. Sensitivity scan: every layer alone pruned to each sparsity of a grid, no training (one
   validation pass per point). It ranks where zeros are cheapest.
2. Pruning ladder: the overall sparsity climbs `sparsity_ladder`; at every rung the per-layer
   sparsities come from the scan (`allocate_sparsity`: big, robust layers first), the weights
   already zero stay zero, and the model is recovered (`prune.recovery`, by default distillation
   from the unpruned model) for at most `step_epochs` epochs with early stopping (`patience`).
   A rung whose validation accuracy falls more than (1 - `quant_share`) x `budget` points below
   the unpruned model's gets one more recovery round; if it still misses, the midpoint between it and
   the last rung accepted is tried once (from that rung's model), and the climb stops there.
3. Code bits: for every layer alone, the fewest bits of `bits_grid` whose k-means shared values cost
   at most `quant_share` x `budget` points, and the same for every bias whose codes and codebook would
   take fewer bytes than its float16 values (a bias is a few hundred bytes of a ~5 KB LeNet-5 file);
   then all layers together, codebooks fine-tuned for at most `codebook_epochs` epochs with early
   stopping. If the whole model is more than `budget`
   points below the unpruned one, every layer gets one bit more (up to 8), and then the next lower
   rung is tried.

Cost: one validation pass per scan point and per bits trial, plus at most `step_epochs` recovery
epochs per rung climbed (twice that on a rung that misses, and the midpoint's) and `codebook_epochs` per
quantization attempt; the trace (returned by `slimkit.pack` as "search" and kept on the model as
`slimkit_search`) lists every step with its validation accuracy, recovery rounds and seconds.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.progress import progress_bar
from slimkit.core.selector import Selector, get_submodule
from slimkit.core.state import copy_model
from slimkit.core.task import Task
from slimkit.core.trainer import accuracy
from slimkit.errors import ConfigError, InfeasibleError
from slimkit.prune.config import PackConfig, PruneConfig
from slimkit.prune.masks import apply_masks, importance_scores, layer_masks, prunable_layers, sparsity_of

SCAN_GRID = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995]


def _points(acc: float) -> float:
    return 100.0 * acc


def _climb(model: nn.Module, task: Task, config: PackConfig, names: list[str], base: float,
           trace: list[dict]) -> list[tuple[float, nn.Module, float]]:
    """The pruning ladder: [(overall sparsity, model, validation accuracy)] of every rung accepted,
    starting with the unpruned model."""
    from slimkit.prune.sensitivity import allocate_sparsity, sensitivity_analysis
    from slimkit.core.recovery import keep_zeros, recover

    recovery = config.prune or PruneConfig(recovery="distill")
    t0 = time.perf_counter()
    analysis = sensitivity_analysis(model, task, grid=SCAN_GRID, selector=Selector(include=names, types=[]))
    trace.append({"step": "sensitivity scan", "points": len(names) * len(SCAN_GRID),
                  "seconds": round(time.perf_counter() - t0, 1)})
    allowed = (1.0 - config.quant_share) * config.budget
    accepted = [(0.0, model, base)]
    current = copy_model(model)
    ladder, bisected = list(config.sparsity_ladder), False
    while ladder:
        target = ladder.pop(0)
        t0 = time.perf_counter()
        try:
            per_layer = allocate_sparsity(analysis, target)
        except InfeasibleError:
            break  # the scan grid cannot reach this sparsity
        # per-layer sparsities only grow along the ladder (the greedy allocation extends its path),
        # so magnitude masks keep every weight already zero at zero
        masks = layer_masks(importance_scores(current, names, "l1"), per_layer)
        apply_masks(current, masks)
        rounds = 0
        while True:  # a rung that misses the budget gets one more recovery round before the climb stops
            rounds += 1
            current = recover(current, model, task, recovery.recovery, seed=recovery.seed,
                              on_step=keep_zeros(current), epochs=config.step_epochs, patience=config.patience,
                              description=f"pack: prune {100 * target:.1f}%")
            apply_masks(current, masks)
            acc = accuracy(current, task, "val")
            ok = _points(base - acc) <= allowed + 1e-9
            if ok or rounds == 2 or config.step_epochs == 0:
                break
        trace.append({"step": "prune", "sparsity": round(sparsity_of(current, names), 4), "val_accuracy": round(acc, 4),
                      "within": ok, "recovery_rounds": rounds, "seconds": round(time.perf_counter() - t0, 1)})
        if not ok:
            # the edge lies between the last rung accepted and this one: try their midpoint once, then stop
            last = accepted[-1][0]
            middle = round((last + target) / 2, 3)
            if bisected or not last < middle < target or target - last < 0.015:
                break
            bisected, ladder = True, [middle]
            current = copy_model(accepted[-1][1])
            continue
        accepted.append((target, current, acc))
        current = copy_model(current)
        if bisected:
            break  # the rung above the midpoint already missed
    return accepted


def _worth_coding(count: int, bits: int) -> bool:
    """Whether `bits`-bit codes and their float16 codebook take fewer bytes than `count` float16 values."""
    return count * bits / 8 + 2 * ((1 << bits) - 1) < 2 * count


@torch.no_grad()
def _bits_scan(model: nn.Module, task: Task, layers: list[tuple[str, nn.Module]], config: PackConfig,
               pruned_acc: float) -> tuple[dict[str, int], dict[str, int]]:
    """Fewest bits per layer's weights, and per layer's bias where codes would take fewer bytes than
    float16 values (each tensor alone quantized), within quant_share x budget of the pruned model.
    Returns (weight bits, bias bits) by layer name."""
    from slimkit.prune.pack import build_codebooks

    allowed = config.quant_share * config.budget
    grid = sorted(config.bits_grid)
    tensors = [(name, module, "weight") for name, module in layers]
    tensors += [(name, module, "bias") for name, module in layers
                if getattr(module, "bias", None) is not None and _worth_coding(module.bias.numel(), grid[0])]
    chosen: dict[str, dict[str, int]] = {"weight": {}, "bias": {}}
    with progress_bar("pack: code bits", len(tensors) * len(grid)) as advance:
        for name, module, attr in tensors:
            tensor = getattr(module, attr)
            original = tensor.detach().clone()
            chosen[attr][name] = grid[-1]
            for bits in grid:
                if attr == "bias" and not _worth_coding(tensor.numel(), bits):
                    advance(len(grid) - grid.index(bits), layer=f"{name}.{attr}")
                    chosen[attr].pop(name)  # no cheaper codes within the budget: the bias stays as it is
                    break
                books = build_codebooks(model, [(name, module)], {name: bits} if attr == "weight" else {},
                                        bias_bits={name: bits} if attr == "bias" else None)
                books.write(model)
                acc = accuracy(model, task, "val")
                tensor.copy_(original)
                advance(1, layer=f"{name}.{attr}")
                if _points(pruned_acc - acc) <= allowed + 1e-9:
                    chosen[attr][name] = bits
                    break
    return chosen["weight"], chosen["bias"]


def _quantize(pruned: nn.Module, task: Task, layers_of, bits: dict[str, int], bias_bits: dict[str, int],
              config: PackConfig) -> nn.Module:
    from slimkit.prune.pack import build_codebooks, finetune_codebooks

    new = copy_model(pruned)
    books = build_codebooks(new, layers_of(new), bits, bias_bits=bias_bits)
    books.write(new)
    if config.codebook_epochs > 0:
        new = finetune_codebooks(new, books, task, epochs=config.codebook_epochs, lr=config.lr, seed=config.seed,
                                 patience=config.patience)
    books.write(new)
    return new


def budget_search(model: nn.Module, config: PackConfig, task: Task | None) -> tuple[nn.Module, dict, list[str], list]:
    """Prune and quantize `model` as far as `config.budget` allows (module docstring); returns
    (model holding exactly the packed values, stage structure, notes, trace)."""
    if task is None or task.val is None or task.metric != "accuracy":
        raise ConfigError("PackConfig budget needs a classification task with a validation split (task=)")
    if config.quantization != "kmeans":
        raise ConfigError("PackConfig budget searches k-means code bits: use quantization='kmeans'")
    layers_of = lambda m: prunable_layers(m, config.selector, what="pack")  # noqa: E731
    names = [n for n, _ in layers_of(model)]
    base = accuracy(model, task, "val")
    trace: list[dict[str, Any]] = [{"step": "unpruned", "val_accuracy": round(base, 4)}]
    rungs = _climb(model, task, config, names, base, trace)
    result = None
    for _, pruned, pruned_acc in reversed(rungs):
        t0 = time.perf_counter()
        bits, bias_bits = _bits_scan(pruned, task, layers_of(pruned), config, pruned_acc)
        while True:
            candidate = _quantize(pruned, task, layers_of, bits, bias_bits, config)
            acc = accuracy(candidate, task, "val")
            ok = _points(base - acc) <= config.budget + 1e-9
            trace.append({"step": "quantize", "sparsity": round(sparsity_of(candidate, names), 4),
                          "bits": dict(bits), "bias_bits": dict(bias_bits), "val_accuracy": round(acc, 4),
                          "within": ok, "seconds": round(time.perf_counter() - t0, 1)})
            if ok or all(b >= 8 for b in bits.values()):
                break
            bits = {n: min(8, b + 1) for n, b in bits.items()}
            # a bias that one bit more would make dearer than its float16 values goes back to float16
            bias_bits = {n: b + 1 for n, b in bias_bits.items()
                         if b < 8 and _worth_coding(get_submodule(pruned, n).bias.numel(), b + 1)}
            t0 = time.perf_counter()
        if ok:
            result = (candidate, bits, bias_bits, acc)
            break
    if result is None:
        raise InfeasibleError(f"pack budget {config.budget} points: even the unpruned model with 8-bit shared values "
                              f"is {_points(base - acc):.2f} points below on validation; raise the budget")
    new, bits, bias_bits, acc = result
    layers = {n: {"sparsity": round(sparsity_of(new, [n]), 4), "bits": bits[n],
                  **({"bias_bits": bias_bits[n]} if n in bias_bits else {})} for n in names}
    structure = {"budget": config.budget, "layers": layers}
    rungs_climbed = sum(1 for t in trace if t["step"] == "prune")
    notes = [f"budget search ({config.budget} validation points): {100 * sparsity_of(new, names):.1f}% of the weights "
             f"zero, validation {100 * base:.2f}% -> {100 * acc:.2f}%; per layer " +
             ", ".join(f"{n} {100 * v['sparsity']:.1f}%/{v['bits']}-bit"
                       + (f" (bias {v['bias_bits']}-bit)" if "bias_bits" in v else "") for n, v in layers.items()) +
             f"; searched {rungs_climbed} pruning rungs in {sum(t.get('seconds', 0) for t in trace):.0f} s"]
    return new, structure, notes, trace


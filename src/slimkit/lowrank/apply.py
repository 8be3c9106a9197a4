"""`slimkit.factorize`: replace Linear / Conv2d layers by low-rank factors, and rebuild them on load.

    small = slimkit.factorize(model, slimkit.LowRankConfig(energy=0.95))
    small = slimkit.factorize(model, slimkit.LowRankConfig(conv_method="tucker2", rank_selection="ratio",
                                                           param_ratio=0.25, recovery="distill"), task=task)

Layers the chosen method cannot handle, or whose factors would not be smaller, are left alone
and reported (stage structure "skipped", model notes); when the user named such a layer (in
`ranks` or as an exact selector pattern) it is an error instead.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slimkit.core import registry
from slimkit.core.progress import progress_bar
from slimkit.core.registry import Technique, chained
from slimkit.core.selector import select, set_submodule
from slimkit.core.state import copy_model
from slimkit.core.swap import SwapPlan, exact_names, restore_swaps, swap_report
from slimkit.core.task import Task
from slimkit.errors import ConfigError, SelectorError
from slimkit.lowrank.config import LowRankConfig
from slimkit.lowrank.decompose import (
    cost,
    factorize_layer,
    input_moments,
    max_rank,
    response_basis,
    spectra,
    unfoldings,
)
from slimkit.lowrank.modules import KINDS, last_layer
from slimkit.lowrank.refit import refit_last_layer
from slimkit.lowrank.rank import energy_rank, kept_energy, largest_rank_within, vbmf_rank

# energies tried, cheapest first, when ranks are chosen by per-layer sensitivity
SENSITIVITY_ENERGIES = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def method_for(layer: nn.Module, config: LowRankConfig) -> tuple[str | None, str | None]:
    """(kind, None) for a layer this config can factorize, or (None, reason) when it cannot."""
    if isinstance(layer, nn.Linear):
        return "svd", None
    if not isinstance(layer, nn.Conv2d):
        return None, f"{type(layer).__name__} is not supported (Linear and Conv2d are)"
    if config.conv_method == "none":
        return None, "convolutions are not factorized (conv_method='none')"
    if layer.groups != 1:
        return None, f"grouped convolution (groups={layer.groups}): low-rank factors of a grouped kernel are not grouped"
    kh, kw = (layer.kernel_size, layer.kernel_size) if isinstance(layer.kernel_size, int) else layer.kernel_size
    if type(layer).forward is not nn.Conv2d.forward and not ((kh, kw) == (1, 1) and layer.stride in (1, (1, 1))):
        # e.g. EfficientNet's Conv2dStaticSamePadding pads in its own forward; factors built from
        # the layer's attributes would lose that (a 1x1, stride-1 kernel needs no padding at all)
        return None, f"{type(layer).__name__} has its own forward (e.g. custom padding); only its 1x1 kernels are factorized"
    if (kh, kw) == (1, 1) or (config.conv_method == "spatial" and (kh == 1 or kw == 1)):
        return "channel", None  # a 1x1 (or 1-D) kernel is a matrix: plain SVD
    if config.conv_method == "spatial" and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return None, f"spatial SVD needs explicit zero padding (padding={layer.padding!r}, mode={layer.padding_mode!r})"
    return config.conv_method, None


def _as_rank(kind: str, value: int | list[int]) -> int | list[int]:
    if kind == "tucker2":
        return list(value) * 2 if isinstance(value, list) and len(value) == 1 else (
            list(value) if isinstance(value, list) else [value, value])
    if isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"a {kind} factorization takes one rank, got {value}")
        return value[0]
    return value


def _rank_by_rule(kind: str, layer: nn.Module, config: LowRankConfig, energy: float | None = None,
                  response: tuple | None = None):
    """Rank from energy / ratio / vbmf (not fixed or sensitivity). `response`: (singular values,
    basis) of the layer's responses when data-aware; energy then refers to output energy."""
    rule = "energy" if energy is not None else config.rank_selection
    if rule == "energy":
        values = [response[0]] if response is not None else spectra(kind, layer)
        ranks = [energy_rank(s, energy if energy is not None else config.energy) for s in values]
    elif rule == "vbmf":
        ranks = [vbmf_rank(m) for m in unfoldings(kind, layer)]
    elif rule == "ratio":
        budget = config.param_ratio * cost(None, layer)[0]
        maxima = max_rank(kind, layer)
        if kind == "tucker2":
            # keep the same fraction of output and input channels; scan that fraction
            best = [1, 1]
            for frac in np.linspace(0.005, 1.0, 400):
                r = [max(1, int(round(frac * maxima[0]))), max(1, int(round(frac * maxima[1])))]
                if cost(kind, layer, r)[0] <= budget:
                    best = r
            return best
        return largest_rank_within(lambda r: cost(kind, layer, r)[0], budget, maxima[0])
    else:
        raise ValueError(rule)
    return ranks if kind == "tucker2" else ranks[0]


def _validate_rank(name: str, kind: str, layer: nn.Module, rank) -> str | None:
    """None if `rank` is within the layer's limits, else why not."""
    maxima = max_rank(kind, layer)
    values = rank if isinstance(rank, list) else [rank]
    for value, limit in zip(values, maxima):
        if value < 1 or value > limit:
            return f"rank {rank} is outside 1..{maxima if len(maxima) > 1 else maxima[0]} for {name} ({kind})"
    return None


def _describe(kind: str, layer: nn.Module, rank, response: tuple | None = None) -> dict[str, Any]:
    p0, m0 = cost(None, layer)
    p1, m1 = cost(kind, layer, rank)
    values = [response[0]] if response is not None else spectra(kind, layer)
    energies = [kept_energy(s, r) for s, r in zip(values, rank if isinstance(rank, list) else [rank])]
    return {"kind": kind, "rank": rank, "params_before": p0, "params_after": p1, "macs_before": m0, "macs_after": m1,
            "energy_kept": [round(e, 6) for e in energies] if kind == "tucker2" else round(energies[0], 6)}


def _sensitivity_rank(model: nn.Module, name: str, kind: str, layer: nn.Module, config: LowRankConfig, task: Task,
                      baseline: float, response: tuple | None = None):
    """Smallest rank (over SENSITIVITY_ENERGIES) whose factorization of this layer alone keeps the
    validation accuracy within max_accuracy_drop; None if no candidate does."""
    from slimkit.core.trainer import accuracy

    tried = []
    for energy in SENSITIVITY_ENERGIES:
        rank = _rank_by_rule(kind, layer, config, energy=energy, response=response)
        if rank in tried:
            continue
        tried.append(rank)
        if config.only_if_smaller and not _is_smaller(kind, layer, rank):
            break  # larger energies only give larger ranks
        set_submodule(model, name, factorize_layer(kind, layer, rank, response))
        try:
            acc = accuracy(model, task, "val")
        finally:
            set_submodule(model, name, layer)
        if baseline - acc <= config.max_accuracy_drop:
            return rank
    return None


def _is_smaller(kind: str, layer: nn.Module, rank) -> bool:
    p0, m0 = cost(None, layer)
    p1, m1 = cost(kind, layer, rank)
    return p1 < p0 and m1 < m0


@chained("factorize")
def factorize(model: nn.Module, config: LowRankConfig | None = None, *, task: Task | None = None) -> nn.Module:
    """Return a copy of `model` with its selected Linear/Conv2d layers replaced by low-rank factors.

    model: a trained model (not modified). config: `LowRankConfig` (default: SVD/Tucker-2 at 95%
    energy). task: needed for rank_selection="sensitivity" and for recovery.
    The per-layer ranks and skipped layers are recorded in the stage structure and as notes.
    """
    config = config or LowRankConfig()
    if (config.rank_selection == "sensitivity" or config.recovery.active or config.data_aware) and task is None:
        raise ConfigError("LowRankConfig: rank_selection='sensitivity', data_aware and recovery need a task (pass task=...)")
    new = copy_model(model)
    selected = select(new, config.selector, default_types=(nn.Linear, nn.Conv2d), what="factorize")
    names = {n for n, _ in selected}
    for name in config.ranks:
        if name not in names:
            raise SelectorError(f"factorize: ranks names layer {name!r}, which is not a selected Linear/Conv2d layer "
                                f"of {type(model).__name__}")
    plan = SwapPlan("factorize", "factorize", exact_names(config.selector) | set(config.ranks))
    baseline = None
    if config.rank_selection == "sensitivity":
        from slimkit.core.trainer import accuracy

        baseline = accuracy(new, task, "val")
    responses: dict[str, tuple] = {}
    if config.data_aware:
        candidates = {n: m for n, m in selected if method_for(m, config)[0] in ("svd", "channel")
                      and not isinstance(getattr(m, "padding", 0), str) and getattr(m, "padding_mode", "zeros") == "zeros"}
        moments = input_moments(new, candidates, task.calibration_batches(max_samples=config.calibration_samples))
        responses = {n: response_basis(method_for(m, config)[0], m, moments[n]) for n, m in candidates.items()
                     if n in moments}
    plans: list[tuple[str, str, nn.Module, Any]] = []
    with progress_bar("factorize: choose ranks", len(selected)) as advance:
        for name, layer in selected:
            advance(1)
            kind, reason = method_for(layer, config)
            if kind is None:
                plan.skip(name, reason)
                continue
            if name in config.ranks:
                rank = _as_rank(kind, config.ranks[name])
                problem = _validate_rank(name, kind, layer, rank)
                if problem:
                    raise ConfigError(f"LowRankConfig.ranks[{name!r}]: {problem}")
            elif config.rank_selection == "fixed":
                rank = _as_rank(kind, config.rank)
                problem = _validate_rank(name, kind, layer, rank)
                if problem:
                    plan.skip(name, problem, unsupported=False)
                    continue
            elif config.rank_selection == "sensitivity":
                rank = _sensitivity_rank(new, name, kind, layer, config, task, baseline, responses.get(name))
                if rank is None:
                    plan.skip(name, f"no candidate rank keeps validation accuracy within "
                                    f"{100 * config.max_accuracy_drop:.2f} points (or none is smaller)", unsupported=False)
                    continue
            else:
                rank = _rank_by_rule(kind, layer, config, response=responses.get(name))
            if config.only_if_smaller and not _is_smaller(kind, layer, rank):
                p0, m0 = cost(None, layer)
                p1, m1 = cost(kind, layer, rank)
                plan.skip(name, f"{kind} rank {rank} would not be smaller ({p1:,} vs {p0:,} params, "
                                f"{m1:,} vs {m0:,} MACs per output)", unsupported=False)
                continue
            plans.append((name, kind, layer, rank))
    if config.data_aware and plans:
        reference = copy_model(model).eval()  # the outputs each refit reproduces
        reference_layers = dict(reference.named_modules())
        was_training = new.training
        new.eval()
    with progress_bar("factorize: decompose", len(plans)) as advance:
        for name, kind, layer, rank in plans:
            response = responses.get(name)
            replacement = factorize_layer(kind, layer, rank, response)
            set_submodule(new, name, replacement)
            refit_error = None
            if config.data_aware and kind != "spatial":  # a spatial SVD ends in a 1xk conv, not a 1x1
                replacement = _with_bias(kind, layer, rank, replacement)
                set_submodule(new, name, replacement)
                replacement.eval()
                refit_error = refit_last_layer(reference, reference_layers[name], new, replacement,
                                               last_layer(replacement), task, samples=config.calibration_samples,
                                               ridge=1e-4)
            replacement.train(layer.training)
            info = plan.layers[name] = _describe(kind, layer, rank, response)
            if response is not None:
                info["basis"] = "responses"
            if refit_error is not None:
                info["bias"] = True  # mean correction / least-squares refit live in the bias
                info["refit_relative_error"] = round(refit_error, 6)
            advance(1)
    if config.data_aware and plans:
        new.train(was_training)
    return plan.finish(new, model, config, task, teacher=model, done="layer(s) factorized",
                       line=lambda v: f"{v['kind']} rank {v['rank']}")


def _with_bias(kind: str, layer: nn.Module, rank, module: nn.Module) -> nn.Module:
    """`module` with a bias on its last factor (the least-squares refit solves one)."""
    if last_layer(module).bias is not None:
        return module
    biased = KINDS[kind].like(layer, rank, bias=True)
    missing = biased.load_state_dict(module.state_dict(), strict=False).missing_keys
    assert all(k.endswith("bias") for k in missing)
    with torch.no_grad():
        last_layer(biased).bias.zero_()
    return biased.to(layer.weight.device)


def factorization_report(model: nn.Module) -> dict[str, Any]:
    """The structure of the last factorize stage applied to `model` ({"layers": ..., "skipped": ...})."""
    return swap_report(model, "factorize")


def restore(model: nn.Module, config: LowRankConfig, structure: dict[str, Any]) -> nn.Module:
    """Rebuild the factorized architecture on a freshly built model (weights are loaded afterwards)."""
    return restore_swaps(model, structure, "factorize", KINDS, "kind", lambda cls, layer, info: cls.like(
        layer, info["rank"], **({"bias": info["bias"]} if "bias" in info else {})))


def _demo(model: nn.Module, task: Task) -> LowRankConfig:
    return LowRankConfig(energy=0.9, recovery={"method": "distill", "epochs": 2})


registry.register(Technique(
    name="factorize", family="lowrank", config_cls=LowRankConfig, apply=factorize, restore=restore, demo=_demo,
    summary="low-rank factorization: SVD (Linear), Tucker-2 / channel / spatial SVD (Conv2d); rank by energy, "
            "parameter ratio, VBMF or sensitivity", order=30))

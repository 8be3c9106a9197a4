"""Calibration: statistics collected in one pass, then clipping thresholds computed from them.

`TensorStats.update(batch)` is the only thing that sees data; `thresholds(stats, method, spec)`
turns the statistics into a clipping range [lo, hi] without touching data again, so the same
statistics serve every method (and tests can feed known distributions).

Methods (for activations; weights use the same functions on the weight tensor itself):
- "minmax":      the exact min and max seen.
- "ema_minmax":  exponential moving average of per-batch min/max (momentum 0.9), robust to one
                 outlier batch.
- "percentile":  the `percentile` (default 99.99) and 100 - percentile quantiles of a uniform sample
                 of the values (of |x| for symmetric specs).
- "mse":         the range, among 100 shrinkings of the min-max range, minimizing the mean squared
                 quantization error on the sample.
- "kl":          TensorRT's entropy calibration: the threshold (over a 2048-bin histogram of |x|)
                 minimizing KL(P || Q) between the clipped distribution and its quantized version.
                 Exact zeros are left out of the histogram: zero is always on the grid, so they
                 cost nothing, but after a ReLU they form a spike that merged bins smear over their
                 neighbours, and KL then prefers the smallest candidate (as many bins as levels,
                 where no bins merge): on ReLU outputs it clipped at amax/8 (EfficientNet-Lite0
                 collapsed to 0.004 top-1 agreement; a ReLU6-like sample: 4.7 dB -> 43.4 dB).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from slimkit.errors import CalibrationError
from slimkit.quantize.numerics import QuantSpec, quant_error, reduce_dims

Method = Literal["minmax", "ema_minmax", "percentile", "mse", "kl"]
METHODS = ("minmax", "ema_minmax", "percentile", "mse", "kl")
SAMPLE_SIZE = 1 << 18  # values kept per tensor: enough for 1e-4 quantiles, small enough for ~200 tensors


class TensorStats:
    """One-pass statistics of a stream of tensors: exact min/max, moving-average min/max, and a
    uniform random sample (reservoir) of the values for percentile / MSE / KL thresholds."""

    def __init__(self, name: str = "tensor", momentum: float = 0.9, sample_size: int = SAMPLE_SIZE, seed: int = 0):
        self.name = name
        self.momentum = momentum
        self.sample_size = sample_size
        self.count = 0
        self.batches = 0
        self.min = self.max = None
        self.ema_min = self.ema_max = None
        self.sample = torch.empty(0)
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # per update (min, max): replays the moving average on merge
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError(f"calibration data produced NaN or Inf at {self.name!r}; "
                                   "check the calibration inputs for NaN/Inf")
        lo, hi = x.min(), x.max()
        self.history.append((lo, hi))
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.ema_min is None:
            self.ema_min, self.ema_max = lo, hi
        else:
            m = self.momentum
            self.ema_min = m * self.ema_min + (1 - m) * lo
            self.ema_max = m * self.ema_max + (1 - m) * hi
        # reservoir: keep a sample that stays uniform over every value seen so far
        n = x.numel()
        total = self.count + n
        k_new = min(n, max(1, round(self.sample_size * n / total)))
        k_old = min(self.sample.numel(), self.sample_size - k_new)
        # sampling with replacement (randint) is O(k), where a permutation of a 25 M-value batch is not
        new = x[torch.randint(0, n, (k_new,), generator=self._gen)] if k_new < n else x
        old = self.sample[torch.randperm(self.sample.numel(), generator=self._gen)[:k_old]]
        self.sample = torch.cat([old, new])
        self.count = total
        self.batches += 1

    def check(self) -> None:
        if self.count == 0:
            raise CalibrationError(f"no calibration statistics for {self.name!r}: the calibration set is empty "
                                   "or the layer never ran")


def merge_stats(parts: list[dict[str, "TensorStats"]]) -> dict[str, "TensorStats"]:
    """The statistics of one pass over consecutive blocks of batches, from the statistics of each block (in
    block order: a data-parallel calibration's ranks). Count, min and max are exact; the moving average is
    replayed over the blocks' per-batch min/max, so it is exact too; the sample draws from each block's
    sample in proportion to its count (while every value fits, it holds every value: the same values as one pass)."""
    merged: dict[str, TensorStats] = {}
    for name in dict.fromkeys(n for part in parts for n in part):
        blocks = [part[name] for part in parts if name in part and part[name].count]
        out = TensorStats(name, momentum=blocks[0].momentum, sample_size=blocks[0].sample_size)
        out.count = sum(b.count for b in blocks)
        out.batches = sum(b.batches for b in blocks)
        out.min = min((b.min for b in blocks), key=float)
        out.max = max((b.max for b in blocks), key=float)
        out.history = [h for b in blocks for h in b.history]
        out.ema_min, out.ema_max = out.history[0]
        for lo, hi in out.history[1:]:
            out.ema_min = out.momentum * out.ema_min + (1 - out.momentum) * lo
            out.ema_max = out.momentum * out.ema_max + (1 - out.momentum) * hi
        keep = [min(b.sample.numel(), round(out.sample_size * b.count / out.count)) for b in blocks]
        out.sample = torch.cat([b.sample if k == b.sample.numel() else
                                b.sample[torch.randperm(b.sample.numel(), generator=out._gen)[:k]]
                                for b, k in zip(blocks, keep)])
        merged[name] = out
    return merged


def _single_thread(fn):
    """Threshold searches run many small tensor ops: one thread is as fast, and immune to the
    oversubscription slow-down (100x) that multi-threaded small ops suffer on a busy machine."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(old)
    return wrapper


def _symmetric_threshold_candidates(amax: float, n: int = 100) -> np.ndarray:
    return amax * np.linspace(1.0 / n, 1.0, n)


def _kl_threshold(values: np.ndarray, levels: int, bins: int = 2048) -> float:
    """TensorRT entropy calibration on |x|: threshold minimizing KL(P || Q). Exact zeros are left
    out (they are represented exactly; as a spike they would drive KL to the smallest candidate)."""
    values = np.abs(values)
    values = values[values > 0]
    if values.size == 0:
        return 0.0
    amax = float(values.max())
    hist, edges = np.histogram(values, bins=bins, range=(0, amax))
    hist = hist.astype(np.float64)
    best_kl, best_i = np.inf, bins
    start = max(levels, 1)
    for i in range(start, bins + 1, 8):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # outliers clipped into the last bin
        nonzero = hist[:i] > 0
        # quantize the first i bins into `levels` bins, spreading each bin's mass over its non-empty source bins
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for idx in chunks:
            nz = nonzero[idx]
            if nz.any():
                q[idx[nz]] = hist[idx].sum() / nz.sum()
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p /= ps
        q /= qs
        mask = p > 0
        q = np.where(mask & (q == 0), 1e-8, q)  # smoothing: an empty source bin must not make KL infinite
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


@_single_thread
def thresholds(stats: TensorStats, method: str, spec: QuantSpec, *, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range [lo, hi] (per tensor) from collected statistics."""
    stats.check()
    if method == "minmax":
        return stats.min.clone(), stats.max.clone()
    if method == "ema_minmax":
        return stats.ema_min.clone(), stats.ema_max.clone()
    sample = stats.sample
    if method == "percentile":
        if not (0 < percentile <= 100):
            raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
        if spec.symmetric:
            t = torch.quantile(sample.abs(), percentile / 100)
            return -t, t
        return torch.quantile(sample, 1 - percentile / 100), torch.quantile(sample, percentile / 100)
    if method == "mse":
        lo, hi = stats.min, stats.max
        sample = sample[:1 << 16]  # the reservoir is already shuffled; 65 k values fix the optimum well
        best, best_err = (lo, hi), float("inf")
        for frac in np.linspace(0.01, 1.0, 100):
            cand = (lo * float(frac), hi * float(frac))
            err = quant_error(sample, cand[0], cand[1], spec).item()
            if err < best_err:
                best, best_err = cand, err
        return best[0].clone(), best[1].clone()
    if method == "kl":
        levels = (spec.qmax - spec.qmin + 1) // (2 if spec.symmetric and spec.signed else 1)
        nonneg = float(stats.min) >= 0
        if nonneg and not spec.symmetric:
            levels = spec.qmax - spec.qmin + 1
        t = torch.tensor(_kl_threshold(sample.numpy(), min(levels, 1024)))
        if nonneg:
            return torch.tensor(0.0), t
        return -t, t
    raise CalibrationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")


@_single_thread
def weight_thresholds(w: torch.Tensor, method: str, spec: QuantSpec, *, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range of a weight at the spec's granularity (per tensor, channel or group).

    "minmax"/"ema_minmax": exact ranges; "percentile": per-slice quantiles; "mse": per-slice search
    over 100 shrinkings of the range minimizing the slice's squared error. ("kl" falls back to "mse":
    weights have no sample distribution worth an entropy fit.)
    """
    from slimkit.quantize.numerics import dequantize, grouped, qparams, quantize, tensor_range

    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise CalibrationError("weights contain NaN or Inf; the model cannot be quantized")
    lo, hi = tensor_range(w, spec)
    if method in ("minmax", "ema_minmax"):
        return lo, hi
    if spec.granularity == "group":
        slices = grouped(w, spec.group_size)
        slices = slices.reshape(-1, spec.group_size)
    elif spec.granularity == "channel":
        slices = w.movedim(spec.axis, 0).reshape(w.shape[spec.axis], -1)
    else:
        slices = w.reshape(1, -1)
    shape = lo.shape
    if method == "percentile":
        q = percentile / 100
        if spec.symmetric:
            t = torch.quantile(slices.abs(), q, dim=1).reshape(shape)
            return -t, t
        return torch.quantile(slices, 1 - q, dim=1).reshape(shape), torch.quantile(slices, q, dim=1).reshape(shape)
    if method in ("mse", "kl"):
        flat_spec = dataclasses.replace(spec, granularity="channel", axis=0)
        lo_f, hi_f = lo.reshape(-1), hi.reshape(-1)
        best_lo, best_hi = lo_f.clone(), hi_f.clone()
        best_err = torch.full_like(lo_f, float("inf"))
        for frac in np.linspace(0.3, 1.0, 71):
            c_lo, c_hi = lo_f * float(frac), hi_f * float(frac)
            s, z = qparams(c_lo, c_hi, flat_spec)
            err = (dequantize(quantize(slices, s, z, flat_spec), s, z, flat_spec) - slices).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        return best_lo.reshape(shape), best_hi.reshape(shape)
    raise CalibrationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")


__all__ = ["TensorStats", "thresholds", "weight_thresholds", "METHODS", "reduce_dims"]

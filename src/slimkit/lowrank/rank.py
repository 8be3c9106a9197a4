"""Rank selection: by energy, by parameter budget, and by VBMF.

All functions take singular values (descending) or a matrix and return an int rank >= 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def energy_rank(singular_values: torch.Tensor | np.ndarray, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2) (at least 1)."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    total = s2.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(s2) / total
    # tolerance: energy=1.0 must give the full rank even with rounding in cumsum
    return int(min(len(s2), np.searchsorted(kept, energy - 1e-12) + 1))


def kept_energy(singular_values: torch.Tensor | np.ndarray, rank: int) -> float:
    """Fraction of squared singular values kept by the first `rank` of them."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    return float(s2[:rank].sum() / s2.sum()) if s2.sum() > 0 else 1.0


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def vbmf_rank(matrix: torch.Tensor | np.ndarray) -> int:
    """Rank of the empirical VBMF solution (Nakajima et al., JMLR 2013), noise variance estimated.

    This is the analytic global solution used by Kim et al. (2016) to pick Tucker ranks of
    convolutions: singular values below sqrt(M sigma^2 (1 + tau)(1 + alpha / tau)) are noise.
    """
    from scipy.optimize import minimize_scalar

    from slimkit.lowrank.decompose import single_threaded_blas

    y = np.asarray(matrix, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    H = L
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    with single_threaded_blas():
        s = np.linalg.svd(y, compute_uv=False)[:H]
    residual = max(float(np.sum(y ** 2) - np.sum(s ** 2)), 0.0) if H < L else 0.0
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = (np.sum(s ** 2) + residual) / (L * M)
    tail = s[eh_ub + 1:] if eh_ub + 1 < len(s) else s[-1:]
    lower = max(tail[0] ** 2 / (M * xubar), float(np.mean(tail ** 2)) / M)
    if not (upper > lower > 0):
        return max(1, int(np.sum(s > 1e-12 * s[0])))

    def objective(sigma2: float) -> float:
        x = s ** 2 / (M * sigma2)
        z1, z2 = x[x > xubar], x[x <= xubar]
        tau_z1 = _tau(z1, alpha)
        return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                     + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (M * sigma2) + (L - H) * np.log(sigma2))

    sigma2 = minimize_scalar(objective, bounds=(lower, upper), method="bounded").x
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))


def largest_rank_within(cost, budget: float, max_rank: int) -> int:
    """Largest r in [1, max_rank] with cost(r) <= budget (cost increasing in r); 1 if none fits."""
    lo, hi = 1, max_rank
    if cost(1) > budget:
        return 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo

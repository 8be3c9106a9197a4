"""Low-rank factorization of trained layers: SVD for Linear, Tucker-2 / channel / spatial SVD for Conv2d.

    small = slimkit.factorize(model, slimkit.LowRankConfig(energy=0.95))
"""
from slimkit.lowrank.apply import factorization_report, factorize
from slimkit.lowrank.config import LowRankConfig

__all__ = ["factorize", "LowRankConfig", "factorization_report"]

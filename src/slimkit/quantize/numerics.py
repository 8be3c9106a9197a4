"""Quantization numerics: integer grids, step sizes, zero points, (fake) quantization, SQNR.

Affine quantization of a real tensor x with step size s > 0 and integer zero point z:

    q  = clamp(round(x / s) + z, qmin, qmax)        (round half to even, as ONNX QuantizeLinear)
    x̂  = s * (q - z)

The integer grid [qmin, qmax] comes from the bit width b and signedness:
signed   [-2^(b-1), 2^(b-1) - 1]   e.g. int8 [-128, 127], int16 [-32768, 32767], int4 [-8, 7]
unsigned [0, 2^b - 1]              e.g. uint8 [0, 255]

Step size and zero point from a clipping range [lo, hi] (the calibrated thresholds, always
widened to contain 0 so that 0 is exactly representable — zero padding and ReLU zeros stay exact):

asymmetric   s = (hi - lo) / (qmax - qmin),  z = clamp(round(qmin - lo / s), qmin, qmax)
symmetric    t = max(|lo|, |hi|); signed grid: s = 2t / (qmax - qmin), z = 0
             (unsigned grid, used for non-negative data: s = t / qmax, z = 0)

Scales are per tensor (one s), per channel (one s per slice along `axis`, e.g. output channels of
a weight) or per group (one s per `group_size` consecutive input elements of each output row).
Bit widths 2-16 are simulated exactly; int8, uint8, int16 and int4 are deployable types.

A spec may use a narrower grid than its storage type (`grid_bits`): int8 weights on the 7-bit grid
[-64, 63]. On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels (VPMADDUBSW) add each pair of
products in int16, which saturates when 255 * (|w_a| + |w_b|) > 32767; with |w| <= 64 no pair can
(255 * 128 = 32640), whichever two weights the kernel pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slimkit.errors import ConfigError

Granularity = Literal["tensor", "channel", "group"]
MIN_BITS, MAX_BITS = 2, 16
_EPS = 1e-12


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid [qmin, qmax] of a `bits`-wide signed or unsigned integer."""
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise ConfigError(f"bit width {bits!r} is out of range; use {MIN_BITS}-{MAX_BITS} bits")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, signedness, symmetric or affine, scale granularity.

    axis: the channel axis for per-channel scales (0 = output channels of a weight).
    group_size: elements per group along the last axis for per-group scales.
    grid_bits: a narrower integer grid inside the `bits`-wide storage type (e.g. 7 for int8 weights
        that must not saturate int16 pair sums; see the module docstring); None: the full type.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
    group_size: int = 128
    grid_bits: int | None = None

    def __post_init__(self) -> None:
        qrange(self.bits, self.signed)  # validates bits
        if self.grid_bits is not None and not (MIN_BITS <= self.grid_bits <= self.bits):
            raise ConfigError(f"grid_bits {self.grid_bits} must be in {MIN_BITS}-{self.bits} (the storage type's bits)")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ConfigError(f"granularity {self.granularity!r}: use tensor, channel or group")
        if self.granularity == "group" and self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return qrange(self.grid_bits or self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.grid_bits or self.bits, self.signed)[1]


def reduce_dims(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...] | None:
    """Dimensions reduced when computing one range per scale (None: all of them)."""
    if spec.granularity == "channel":
        return tuple(d for d in range(x.dim()) if d != spec.axis % x.dim())
    return None


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a weight (out, in, ...) as (out, in/group_size, group_size) for per-group scales."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] % group_size:
        raise ConfigError(f"per-group quantization: {flat.shape[1]} input elements are not divisible by "
                          f"group_size {group_size}")
    return flat.reshape(flat.shape[0], -1, group_size)


def tensor_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact min and max of `x` at the spec's granularity (group ranges have shape (out, groups))."""
    x = x.detach().float()
    if spec.granularity == "group":
        g = grouped(x, spec.group_size)
        return g.amin(-1), g.amax(-1)
    dims = reduce_dims(x, spec)
    if dims is None:
        return x.min(), x.max()
    return x.amin(dim=dims), x.amax(dim=dims)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size s (float32) and zero point z (int64) covering the clipping range [lo, hi]."""
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ConfigError("quantization range is not finite (NaN/Inf in the statistics)")
    lo = torch.minimum(lo, torch.zeros_like(lo))  # 0 must be representable exactly
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        t = torch.maximum(-lo, hi)
        if spec.signed:
            scale = 2 * t / (qmax - qmin)
        else:
            scale = t / qmax
        scale = scale.clamp(min=_EPS)
        zp = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int64)
    return scale, zp


def _broadcast(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape per-channel parameters so they broadcast against `x`."""
    if p.dim() == 0 or spec.granularity != "channel":
        return p
    shape = [1] * x.dim()
    shape[spec.axis % x.dim()] = -1
    return p.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes q = clamp(round(x / s) + z, qmin, qmax) (as int64)."""
    if spec.granularity == "group":
        g = grouped(x.float(), spec.group_size)
        q = torch.round(g / scale[..., None]) + zero_point[..., None]
        return q.clamp(spec.qmin, spec.qmax).to(torch.int64).reshape(x.shape)
    s, z = _broadcast(scale, x, spec), _broadcast(zero_point, x, spec)
    return torch.clamp(torch.round(x.float() / s) + z, spec.qmin, spec.qmax).to(torch.int64)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x̂ = s * (q - z)."""
    if spec.granularity == "group":
        g = grouped(q.float(), spec.group_size)
        return ((g - zero_point[..., None]) * scale[..., None]).reshape(q.shape)
    s, z = _broadcast(scale, q, spec), _broadcast(zero_point, q, spec)
    return (q.float() - z) * s


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable x̂ = s (clamp(round(x/s) + z) - z): STE for round, clipped gradient outside the
    range, and the LSQ gradient for `scale` when it requires grad."""
    if spec.granularity == "group":
        g = grouped(x, spec.group_size)
        s, z = scale[..., None], zero_point[..., None].to(x.dtype)
        q = torch.clamp(round_ste(g / s) + z, spec.qmin, spec.qmax)
        return ((q - z) * s).reshape(x.shape)
    s = _broadcast(scale, x, spec)
    z = _broadcast(zero_point, x, spec).to(x.dtype)
    q = torch.clamp(round_ste(x / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


def quant_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Mean squared error of quantizing `x` with the range [lo, hi]."""
    scale, zp = qparams(lo, hi, spec)
    return (dequantize(quantize(x, scale, zp, spec), scale, zp, spec) - x).pow(2).mean()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|x|² / |x - x̂|²) in dB (inf when exact)."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()

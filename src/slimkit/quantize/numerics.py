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

On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels (VPMADDUBSW) add each pair of products in
int16, which saturates when 255 * (|w_a| + |w_b|) > 32767 for two weights of one sign. Two ways keep
int8 weights clear of it:
- `pair_bound` (128): the full grid, with every same-sign pair of weights the kernels pair — input
  channels 2i and 2i+1 of one output row at one kernel position (they pack 4 consecutive input
  channels per 32-bit lane: MLAS's QGEMM and its symmetric convolution, likewise oneDNN's blocked
  int8 layouts) — limited to |q_a| + |q_b| <= 128 (255 * 128 = 32640). About 2% of pairs of a
  typical layer exceed it; `limit_pairs` lowers both codes of such a pair by half the excess each.
- `grid_bits` (7): a narrower grid than the storage type, [-64, 63]: no pair can saturate, whichever
  two weights a kernel pairs (used where the pairing is not known, e.g. a KxK convolution with an
  odd number of input channels).
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
    pair_bound: for symmetric signed weights, the largest |q_a| + |q_b| of a same-sign pair of input
        channels (2i, 2i+1) of one output row and kernel position (`limit_pairs`); None: no limit.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
    group_size: int = 128
    grid_bits: int | None = None
    pair_bound: int | None = None

    def __post_init__(self) -> None:
        qrange(self.bits, self.signed)  # validates bits
        if self.pair_bound is not None and not (self.symmetric and self.signed and self.pair_bound >= self.qmax):
            raise ConfigError(f"pair_bound {self.pair_bound} needs symmetric signed codes and at least qmax ({self.qmax})")
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


def broadcast(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
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
        q = q.clamp(spec.qmin, spec.qmax).to(torch.int64).reshape(x.shape)
    else:
        s, z = broadcast(scale, x, spec), broadcast(zero_point, x, spec)
        q = torch.clamp(torch.round(x.float() / s) + z, spec.qmin, spec.qmax).to(torch.int64)
    return limit_pairs(q, spec.pair_bound) if spec.pair_bound else q


def limit_pairs(q: torch.Tensor, bound: int) -> torch.Tensor:
    """Codes (zero point 0) of a weight (out, in, *kernel) with every same-sign pair of input channels
    (2i, 2i+1) — at each output row and kernel position — limited to |q_a| + |q_b| <= bound: the excess is
    taken off both, half each (the larger code loses the odd unit), so the rounding error stays small.
    Signs are kept; the codes' dtype too."""
    if q.dim() < 2 or q.shape[1] < 2:
        return q
    even = q.shape[1] - q.shape[1] % 2
    a, b = q[:, 0:even:2].double(), q[:, 1:even:2].double()
    excess = ((a.abs() + b.abs() - bound).clamp(min=0) * ((a * b) > 0)).round()
    if not excess.any():
        return q
    big = torch.ceil(excess / 2)
    cut_a = torch.where(a.abs() >= b.abs(), big, excess - big)
    out = q.clone()
    out[:, 0:even:2] = (a - a.sign() * cut_a).to(q.dtype)
    out[:, 1:even:2] = (b - b.sign() * (excess - cut_a)).to(q.dtype)
    return out


def pair_scale(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
               steps: int = 24) -> torch.Tensor:
    """Step sizes for weights under `spec.pair_bound`: for each scale (per channel or per tensor), the
    multiple f * scale, f in [1, 2], whose pair-limited codes reconstruct `w` with the least squared
    error. f = 1 keeps the whole grid and limits the pairs that exceed the bound; f = 2 halves the grid
    so that no pair exceeds it (the 7-bit grid); rows with a few large pairs stay near 1, rows with many
    (wide, flat weight distributions) move towards 2."""
    if not spec.pair_bound or spec.granularity == "group":
        return scale
    w = w.detach().float()
    dims = tuple(range(1, w.dim())) if spec.granularity == "channel" and scale.dim() > 0 else None
    best, best_err = scale.clone(), None
    for f in torch.linspace(1.0, 2.0, steps + 1):
        s = scale * f
        err = (dequantize(quantize(w, s, zero_point, spec), s, zero_point, spec) - w).pow(2)
        err = err.sum(dims) if dims else err.sum()
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.minimum(err, best_err)
    return best


def pairs_within_bound(q: torch.Tensor, bound: int) -> bool:
    """True when no same-sign pair of input channels (2i, 2i+1) of `q` exceeds |q_a| + |q_b| = bound."""
    return bool(torch.equal(limit_pairs(q, bound), q))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x̂ = s * (q - z)."""
    if spec.granularity == "group":
        g = grouped(q.float(), spec.group_size)
        return ((g - zero_point[..., None]) * scale[..., None]).reshape(q.shape)
    s, z = broadcast(scale, q, spec), broadcast(zero_point, q, spec)
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
        if spec.pair_bound:  # symmetric: z = 0; the limit is a step function of the codes (STE)
            q = pair_limited(q.reshape(x.shape), spec.pair_bound).reshape(q.shape)
        return ((q - z) * s).reshape(x.shape)
    s = broadcast(scale, x, spec)
    z = broadcast(zero_point, x, spec).to(x.dtype)
    q = torch.clamp(round_ste(x / s) + z, spec.qmin, spec.qmax)
    if spec.pair_bound:
        q = pair_limited(q, spec.pair_bound)
    return (q - z) * s


def pair_limited(q: torch.Tensor, bound: int) -> torch.Tensor:
    """`limit_pairs` of float codes in the forward pass, identity gradient."""
    return q + (limit_pairs(q.detach(), bound) - q.detach())


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

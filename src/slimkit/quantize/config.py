"""`QuantConfig`: what to quantize, to which integer types, how thresholds are calibrated."""
from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from slimkit.core.config import Config
from slimkit.core.selector import Selector
from slimkit.quantize.numerics import MAX_BITS, MIN_BITS, QuantSpec

_TYPE = re.compile(r"^(u?)int(\d+)$")
CalibrationMethod = Literal["minmax", "ema_minmax", "percentile", "mse", "kl"]
Target = Literal["portable", "x86-avx2", "x86-vnni", "arm64"]
# Targets whose int8 kernels add u8 x s8 product pairs in int16 (x86 without VNNI, VPMADDUBSW): int8
# weights there keep every pair the kernels form within |q_a| + |q_b| <= 128 (or use the 7-bit grid where
# the pairing is not known), so no pair sum can saturate. "portable" must run right on them.
SATURATING_TARGETS = ("portable", "x86-avx2")
PAIR_BOUND = 128  # 255 * 128 = 32640 <= 32767: a pair of u8 x s8 products cannot saturate int16


def parse_type(name: str, *, what: str) -> tuple[int, bool]:
    """'int8' -> (8, True), 'uint8' -> (8, False); raises ConfigError naming `what` when invalid."""
    from slimkit.errors import ConfigError

    m = _TYPE.match(name)
    if not m:
        raise ConfigError(f"QuantConfig.{what}: {name!r} is not an integer type; use intN or uintN "
                          f"with N in {MIN_BITS}-{MAX_BITS} (e.g. int8, uint8, int4, int16), or 'none'")
    bits = int(m.group(2))
    if not (MIN_BITS <= bits <= MAX_BITS):
        raise ConfigError(f"QuantConfig.{what}: bit width {bits} of {name!r} is out of range; "
                          f"use {MIN_BITS}-{MAX_BITS} bits")
    return bits, m.group(1) != "u"


class MixedPrecisionConfig(Config):
    """Per-layer weight bit widths chosen from `candidates` by measured sensitivity.

    Exactly one budget: `size_fraction` (weight bytes relative to all layers at the highest candidate)
    or `max_accuracy_drop` (points, fraction of 1, on the validation split).
    """

    candidates: list[int] = Field(default_factory=lambda: [4, 8])
    size_fraction: float | None = Field(None, gt=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_budget(self):
        from slimkit.errors import ConfigError

        if (self.size_fraction is None) == (self.max_accuracy_drop is None):
            raise ConfigError("MixedPrecisionConfig: give exactly one of size_fraction or max_accuracy_drop")
        if len(set(self.candidates)) < 2:
            raise ConfigError(f"MixedPrecisionConfig.candidates: give at least two different bit widths, "
                              f"got {self.candidates}")
        for b in self.candidates:
            if not (MIN_BITS <= b <= MAX_BITS):
                raise ConfigError(f"MixedPrecisionConfig.candidates: bit width {b} is out of range "
                                  f"({MIN_BITS}-{MAX_BITS})")
        return self


class QuantConfig(Config):
    """Quantization of weights and activations.

    weights / activations: "int8", "uint8", "int16", "int4", any "intN"/"uintN" with N in 2-16
        (other than int8/uint8/int16 — and int4 weight-only Linear — simulated only), or "none".
    mode: "static" (activation ranges calibrated on data), "dynamic" (activation ranges computed per
        batch at run time; Linear layers), "weight_only" (activations stay float). Activations "none"
        implies weight_only.
    per_channel: one weight scale per output channel (else per tensor); group_size: per-group scales
        of that many input elements (Linear, low-bit weight-only).
    calibration / weight_calibration: threshold methods (minmax, ema_minmax, percentile, mse, kl).
    fold_bn, equalize (cross-layer equalization), bias_correction, adaround: accuracy-preserving PTQ.
    adaround_layers: layer-name patterns AdaRound learns the rounding of (default: every layer; it
        costs a few minutes per large layer on a CPU, so pick the sensitive ones).
    gptq: second-order rounding of every layer's weights (GPTQ): one statistics pass, then seconds
        per layer; an alternative to AdaRound (not both).
    qat_epochs > 0: quantization-aware training (STE + LSQ step sizes) from the PTQ result.
    keep_float: layer-name patterns left in float (reported).
    embeddings (default on): `nn.Embedding` tables are quantized too, in every mode, with the weights'
        bit width: symmetric codes, one scale per row (per `group_size` elements of a row for 4-bit
        groups). The ONNX file stores the codes (int8/int16; 4-bit groups packed two per byte and
        gathered by ONNX Runtime's GatherBlockQuantized) and dequantizes only the rows looked up. In a
        transformer they are most of the weights (MiniLM: 12.1 M of 22.7 M). The selector and
        `keep_float` apply to them like to any layer.
    speed_check (default on): time the int8 ONNX file against the float one on ONNX Runtime
        (`speed_threads` threads, each of `speed_batch_sizes`, interleaved rounds) and keep in float the
        layers with the fewest MACs where int8 is slower, up to the whole model (`quantize/speed.py`);
        the notes list what was kept. Static and dynamic modes on deployable types.
    target: the CPUs the int8 file must run right on. ONNX Runtime's u8 x s8 kernels on x86 without
        VNNI add pairs of products (input channels 2i, 2i+1) in int16, which full 8-bit weights can
        saturate (wrong results on those CPUs only). "portable" (default) and "x86-avx2": int8 weights
        that meet 8-bit activations (static, dynamic) keep the full grid with every same-sign pair of
        input channels limited to |q_a| + |q_b| <= 128 (`numerics.limit_pairs`; about 2% of pairs
        change); KxK convolutions with an odd number of input channels per group, where a kernel may
        pair channels across kernel positions, use the 7-bit grid [-64, 63]; depthwise convolutions
        keep the full grid (their kernel accumulates in int32). "x86-vnni" (AVX-512 VNNI / AVX-VNNI /
        AMX) and "arm64" accumulate in int32: the full grid, no limit; such a file gives wrong answers
        on an AVX2-only x86 CPU.
    blame: measure each activation quantizer's and each layer's weights' share of the output error
        (leave-one-out, one forward per quantizer and per layer on a calibration batch;
        `slimkit.quantize.blame`): in the notes and the report. Needs calibration data in every mode.
    """

    technique: ClassVar[str] = "quantize"

    weights: str = "int8"
    activations: str = "uint8"
    mode: Literal["static", "dynamic", "weight_only"] = "static"
    per_channel: bool = True
    group_size: int | None = Field(None, ge=8)
    symmetric_activations: bool = False
    calibration: CalibrationMethod = "percentile"
    weight_calibration: CalibrationMethod = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)
    calibration_samples: int = Field(512, ge=1)
    fold_bn: bool = True
    equalize: bool = False
    bias_correction: bool = False
    adaround: bool = False
    adaround_iters: int = Field(1000, ge=1)
    adaround_layers: list[str] | None = None
    gptq: bool = False
    qat_epochs: int = Field(0, ge=0)
    qat_lr: float = Field(1e-4, gt=0)
    mixed_precision: MixedPrecisionConfig | None = None
    keep_float: list[str] = Field(default_factory=list)
    embeddings: bool = True
    quantize_output: bool = False
    blame: bool = False
    target: Target = "portable"
    speed_check: bool = True
    speed_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    speed_threads: int = Field(1, ge=1)
    selector: Selector | None = None

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: str) -> str:
        parse_type(v, what="weights")
        return v

    @field_validator("activations")
    @classmethod
    def _check_activations(cls, v: str) -> str:
        if v != "none":
            parse_type(v, what="activations")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        from slimkit.errors import ConfigError

        if self.activations == "none" and self.mode == "static":
            object.__setattr__(self, "mode", "weight_only")
        if self.mode == "dynamic" and self.activations not in ("uint8", "int8"):
            raise ConfigError("QuantConfig: dynamic mode quantizes activations to 8 bits per batch; "
                              f"activations={self.activations!r} is not supported there")
        if self.adaround and self.gptq:
            raise ConfigError("QuantConfig: adaround and gptq both choose the weights' rounding; pick one")
        if self.gptq and self.mode == "dynamic":
            raise ConfigError("QuantConfig: gptq needs static or weight-only mode (it rounds against the inputs "
                              "calibration shows each layer)")
        if self.qat_epochs and self.mode == "dynamic":
            raise ConfigError("QuantConfig: QAT needs static or weight-only mode")
        if not self.speed_batch_sizes or any(bs < 1 for bs in self.speed_batch_sizes):
            raise ConfigError(f"QuantConfig.speed_batch_sizes: give batch sizes >= 1, got {self.speed_batch_sizes}")
        return self

    def layer_selector(self, layers: list[str] | None = None) -> Selector:
        """The layers to quantize: `layers` exactly when given, else `selector` minus `keep_float`."""
        if layers is not None:
            return Selector(include=layers or ["__none__"])
        sel = self.selector or Selector()
        if self.keep_float:
            sel = Selector(include=sel.include, exclude=sel.exclude + self.keep_float, types=sel.types)
        return sel

    # -- specs ---------------------------------------------------------------------------
    def integer_matmul(self) -> bool:
        """True when the weights meet 8-bit activations in ONNX Runtime's u8 x s8 integer kernels."""
        return self.mode in ("static", "dynamic") and self.activations in ("uint8", "int8")

    def weight_spec(self, bits: int | None = None) -> QuantSpec:
        wbits, signed = parse_type(self.weights, what="weights")
        bits = bits or wbits
        granularity = "group" if self.group_size else ("channel" if self.per_channel else "tensor")
        # int8 weights meeting 8-bit activations on CPUs whose kernels may pair products in int16: every
        # same-sign pair of input channels limited to |q_a| + |q_b| <= 128 (layers where the kernels' pairing
        # is not known get the 7-bit grid instead: `graph.pair_safe_spec`)
        narrow = bits == 8 and signed and self.integer_matmul() and self.target in SATURATING_TARGETS
        return QuantSpec(bits=bits, signed=signed, symmetric=True, granularity=granularity, axis=0,
                         group_size=self.group_size or 128, pair_bound=PAIR_BOUND if narrow else None)

    def activation_spec(self) -> QuantSpec | None:
        if self.mode != "static" or self.activations == "none":
            return None
        bits, signed = parse_type(self.activations, what="activations")
        return QuantSpec(bits=bits, signed=signed, symmetric=self.symmetric_activations, granularity="tensor")

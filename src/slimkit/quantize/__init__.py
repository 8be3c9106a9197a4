"""Quantization: int8/uint8/int16 (deployable) and 2-16-bit (simulated) weights and activations,
static / dynamic / weight-only, calibrated thresholds, BN folding, cross-layer equalization, bias
correction, AdaRound, QAT (LSQ), mixed precision, ONNX QDQ export running on int8 kernels.

Numerics (see `slimkit.quantize.numerics` and docs/quantization.md):
    q = clamp(round(x / s) + z, qmin, qmax),  x̂ = s (q - z)

    q = slimkit.quantize(model, slimkit.QuantConfig(weights="int8", activations="uint8"), task=task)
    slimkit.export(q, "model.onnx", example_input=task.example_input(1))
"""
from slimkit.quantize.apply import quantize, restore
from slimkit.quantize.blame import blame, float_layer_weights
from slimkit.quantize.config import MixedPrecisionConfig, QuantConfig
from slimkit.quantize.export import check_parity, export_quantized
from slimkit.quantize.numerics import QuantSpec, sqnr_db
from slimkit.quantize.pt2e import Pt2eConfig, quantize_pt2e

__all__ = ["quantize", "QuantConfig", "MixedPrecisionConfig", "QuantSpec", "export_quantized", "check_parity",
           "sqnr_db", "restore", "quantize_pt2e", "Pt2eConfig", "blame", "float_layer_weights"]


from slimkit.core.verbs import make_callable  # noqa: E402

make_callable(__name__, "quantize")  # `slimkit.quantize(model, config)` (see core/verbs.py)

"""Quantization numerics and calibration on known distributions (no models)."""
import math

import pytest
import torch

from slimkit.errors import CalibrationError, ConfigError
from slimkit.quantize.calibration import METHODS, TensorStats, thresholds, weight_thresholds
from slimkit.quantize.numerics import QuantSpec, dequantize, fake_quantize, qparams, qrange, quantize, sqnr_db


def _roundtrip(x, lo, hi, spec):
    s, z = qparams(lo, hi, spec)
    return dequantize(quantize(x, s, z, spec), s, z, spec)


def test_integer_grids():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(16, True) == (-32768, 32767)
    assert qrange(4, True) == (-8, 7)
    for bits in (1, 17, 32):
        with pytest.raises(ConfigError, match="bit width"):
            qrange(bits, True)
    with pytest.raises(ConfigError, match="bit width"):
        QuantSpec(bits=0)


def test_affine_formula_and_zero_exact():
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    s, z = qparams(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert math.isclose(s.item(), 4.0 / 255, rel_tol=1e-6)
    assert z.item() == round(0 - (-1.0) / s.item())
    x = torch.tensor([0.0, -1.0, 3.0, 10.0])
    q = quantize(x, s, z, spec)
    assert q.tolist()[0] == z.item()  # 0 maps to the zero point exactly
    assert q.max().item() == 255  # clamped
    assert dequantize(q, s, z, spec)[0].item() == 0.0
    sym = QuantSpec(bits=8, signed=True, symmetric=True)
    s, z = qparams(torch.tensor(-2.0), torch.tensor(1.0), sym)
    assert z.item() == 0 and math.isclose(s.item(), 4.0 / 255, rel_tol=1e-6)


def test_int16_roundtrip_error_bound():
    torch.manual_seed(0)
    x = torch.randn(10_000) * 3
    spec = QuantSpec(bits=16, signed=True, symmetric=True)
    s, z = qparams(x.min(), x.max(), spec)
    err = (dequantize(quantize(x, s, z, spec), s, z, spec) - x).abs().max().item()
    assert err <= s.item() / 2 + 1e-6  # half a step, plus float32 rounding of s * q
    assert sqnr_db(x, _roundtrip(x, x.min(), x.max(), spec)) > 85  # ~6 dB per bit


def test_per_group_and_per_channel_shapes():
    w = torch.randn(16, 64)
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    lo, hi = weight_thresholds(w, "minmax", spec)
    assert lo.shape == (16, 2)
    s, z = qparams(lo, hi, spec)
    assert dequantize(quantize(w, s, z, spec), s, z, spec).shape == w.shape
    with pytest.raises(ConfigError, match="divisible"):
        weight_thresholds(torch.randn(4, 30), "minmax", spec)


def test_fake_quant_ste_and_lsq_gradients():
    spec = QuantSpec(bits=8, signed=True, symmetric=True)
    x = torch.linspace(-2, 2, 101, requires_grad=True)
    scale = torch.tensor(1.0 / 127, requires_grad=True)
    y = fake_quantize(x, scale, torch.tensor(0), spec)
    y.sum().backward()
    inside = x.detach().abs() < 127 / 127 - 1e-3
    assert torch.all(x.grad[inside] == 1)  # straight through inside the range
    assert torch.all(x.grad[x.detach().abs() > 1.01] == 0)  # zero where clipped
    assert scale.grad is not None and scale.grad.abs().item() > 0  # LSQ step-size gradient


def _stats(x, chunks=8):
    st = TensorStats("t")
    for part in x.chunk(chunks):
        st.update(part)
    return st


@pytest.mark.parametrize("method", METHODS)
def test_sqnr_bounds_gaussian(method):
    torch.manual_seed(0)
    x = torch.randn(50_000)
    spec = QuantSpec(bits=8, signed=True, symmetric=False)
    lo, hi = thresholds(_stats(x), method, spec)
    assert sqnr_db(x, _roundtrip(x, lo, hi, spec)) > 35  # ~40 dB for 8-bit Gaussian


@pytest.mark.parametrize("method", ["percentile", "kl"])
def test_clipping_methods_beat_minmax_with_outliers(method):
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    x[:5] = 500.0  # a handful of huge outliers dominate min-max
    spec = QuantSpec(bits=8, signed=True, symmetric=True)
    st = _stats(x)
    body = x[5:]
    minmax = sqnr_db(body, _roundtrip(body, *thresholds(st, "minmax", spec), spec))
    clipped = sqnr_db(body, _roundtrip(body, *thresholds(st, method, spec), spec))
    assert minmax < 25
    assert clipped > minmax + 10


def test_kl_is_not_fooled_by_the_zeros_after_a_relu():
    # half the values exactly zero, as after a ReLU6: the zero spike once drove KL to clip at amax/8 (4.7 dB)
    torch.manual_seed(0)
    x = (torch.randn(50_000) * 1.5 - 1.0).clamp(0, 6)
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    lo, hi = thresholds(_stats(x), "kl", spec)
    assert hi > 0.5 * x.max()
    assert sqnr_db(x, _roundtrip(x, lo, hi, spec)) > 35
    assert thresholds(_stats(torch.zeros(1000)), "kl", spec)[1] == 0  # all zeros: nothing to clip


def test_mse_clips_heavy_tails_at_low_bits():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    st = _stats(x)
    minmax = sqnr_db(x, _roundtrip(x, *thresholds(st, "minmax", spec), spec))
    mse = sqnr_db(x, _roundtrip(x, *thresholds(st, "mse", spec), spec))
    assert mse > minmax + 3


def test_ema_minmax_discounts_one_outlier_batch():
    st = TensorStats("t")
    for i in range(50):
        st.update(torch.randn(1000) * (100 if i == 0 else 1))
    spec = QuantSpec()
    lo, hi = thresholds(st, "ema_minmax", spec)
    lo_m, hi_m = thresholds(st, "minmax", spec)
    assert hi < 0.5 * hi_m


def test_calibration_errors():
    st = TensorStats("layer3")
    with pytest.raises(CalibrationError, match="layer3"):
        st.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match="empty"):
        thresholds(TensorStats("x"), "minmax", QuantSpec())
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        thresholds(_stats(torch.randn(100)), "bogus", QuantSpec())


def test_per_channel_beats_per_tensor_on_depthwise():
    """Depthwise convs have channels of wildly different ranges: per-tensor scales zero out the small ones."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-3, 1, 32).reshape(-1, 1, 1, 1))
    x = torch.randn(4, 32, 16, 16)
    ref = conv(x)
    out = {}
    for gran in ("tensor", "channel"):
        spec = QuantSpec(bits=8, granularity=gran)
        wq = _roundtrip(conv.weight.detach(), *weight_thresholds(conv.weight, "minmax", spec), spec)
        y = torch.nn.functional.conv2d(x, wq, padding=1, groups=32)
        # per-channel SQNR averaged over output channels: each channel matters downstream
        out[gran] = sum(sqnr_db(ref[:, c], y[:, c]) for c in range(32)) / 32
    assert out["channel"] > 40
    assert out["channel"] > out["tensor"] + 15


def test_weight_mse_calibration_not_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[0, 0] = 20.0
    spec = QuantSpec(bits=4, granularity="channel")
    e_mm = (_roundtrip(w, *weight_thresholds(w, "minmax", spec), spec) - w).pow(2).mean()
    e_mse = (_roundtrip(w, *weight_thresholds(w, "mse", spec), spec) - w).pow(2).mean()
    assert e_mse < e_mm

"""int8 that is right on every CPU: with the default target no u8 x s8 pair sum can saturate an int16
accumulator (ONNX Runtime's AVX2 kernels without VNNI add the products of input channels 2i, 2i+1 in
int16), checked on the exported file itself, by an emulation of those kernels, and by ONNX Runtime's
fused kernels on inputs at the top of the range. Every assertion here holds on AVX2-only and AVX-512
VNNI machines alike."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.torch import save_file

import slimkit as sk
from slimkit.quantize import QuantConfig, check_parity, export_quantized
from slimkit.quantize.graph import weight_layers

INT16_MAX = 32767


def _int8_weight_codes(path) -> dict[str, np.ndarray]:
    """Every int8 initializer of rank >= 2 in an exported file: the weights the integer kernels multiply."""
    graph = onnx.load(str(path)).graph
    tensors = list(graph.initializer) + [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                                         if a.name == "value"]
    return {t.name or f"constant{i}": numpy_helper.to_array(t) for i, t in enumerate(tensors)
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2}


def _worst_any_pair(codes: np.ndarray) -> int:
    """The largest |u8 * w_a + u8 * w_b| any two weights of one output row can reach (u8 = 255), whichever
    two a kernel pairs: 255 * (the two largest magnitudes of the row)."""
    rows = np.abs(codes.reshape(codes.shape[0], -1).astype(np.int64))
    top2 = -np.sort(-rows, axis=1)[:, :2] if rows.shape[1] > 1 else np.pad(rows, ((0, 0), (0, 1)))
    return int(255 * top2.sum(1).max())


def _worst_channel_pair(codes: np.ndarray) -> int:
    """The largest |u8 * w_a + u8 * w_b| (u8 = 255) over the pairs the kernels add in int16: input channels
    2i, 2i+1 (axis 1: Gemm weights with transB, convolution weights) at one kernel position."""
    c = codes.astype(np.int64)
    c = np.pad(c, [(0, 0), (0, c.shape[1] % 2)] + [(0, 0)] * (c.ndim - 2))
    a, b = c[:, 0::2], c[:, 1::2]
    same = np.where(a * b > 0, np.abs(a) + np.abs(b), np.maximum(np.abs(a), np.abs(b)))
    return int(255 * same.max())


def _worst_kernel_pair(codes: np.ndarray) -> int:
    """Channel pairs where the kernels pair channels (Gemm, 1x1 and even-channel convolutions), any pair
    where a KxK convolution's odd channel count lets them pair across kernel positions."""
    odd_kxk = codes.ndim > 2 and codes[0, 0].size > 1 and codes.shape[1] % 2
    return _worst_any_pair(codes) if odd_kxk else _worst_channel_pair(codes)


@pytest.fixture(scope="module")
def quantized(trained_lenet5, digits_task):
    # speed_check off: on LeNet-5 int8 is slower than float and the default would keep it float
    return {target: sk.quantize(trained_lenet5, QuantConfig(target=target, speed_check=False), task=digits_task)
            for target in ("portable", "x86-vnni")}


def test_portable_weights_cannot_saturate_any_int16_pair(quantized, digits_task, tmp_path):
    worst = {}
    for target, q in quantized.items():
        path = export_quantized(q, tmp_path / f"{target}.onnx", digits_task.example_input(1))
        codes = _int8_weight_codes(path)
        assert len(codes) == 5  # two convolutions, three linear layers
        worst[target] = max(_worst_kernel_pair(c) for c in codes.values())
        if target == "portable":  # the full grid is used: only pairs are limited
            assert max(np.abs(c).max() for c in codes.values()) > 64
    assert worst["portable"] <= INT16_MAX
    assert worst["x86-vnni"] > INT16_MAX  # the full grid can saturate: the check above can fail
    notes = " ".join(quantized["portable"].slimkit_notes)
    assert "|q_a| + |q_b| <= 128" in notes and "x86-vnni" in notes
    assert "use the 7-bit grid [-64, 63] (features.0)" in notes  # 5x5 conv on one input channel
    assert "right only on the target's CPUs" in " ".join(quantized["x86-vnni"].slimkit_notes)


def test_limit_pairs_takes_the_excess_off_both_codes():
    from slimkit.quantize.numerics import limit_pairs, pairs_within_bound

    q = torch.tensor([[127, 100, -128, -1, -127, -127, 127, -128, 5]])
    out = limit_pairs(q, 128)
    assert out.tolist() == [[77, 51, -127, -1, -64, -64, 127, -128, 5]]  # opposite signs never saturate
    assert pairs_within_bound(out, 128) and not pairs_within_bound(q, 128)
    w = torch.randint(-128, 128, (16, 10, 3, 3))
    limited = limit_pairs(w, 128)
    assert torch.equal(limit_pairs(limited, 128), limited)  # idempotent
    assert (limited.sign() * w.sign() >= 0).all() and (limited.abs() <= w.abs()).all()
    assert torch.equal(limited[:, :, 1, 2], limit_pairs(w[:, :, 1, 2], 128))  # pairs within a kernel position


def test_gptq_and_adaround_roundings_keep_the_pair_limit(trained_lenet5, digits_task):
    from slimkit.quantize.numerics import pairs_within_bound

    for extra in ({"gptq": True}, {"adaround": True, "adaround_iters": 20}):
        q = sk.quantize(trained_lenet5, QuantConfig(speed_check=False, calibration_samples=64, **extra), task=digits_task)
        for name, m in weight_layers(q).items():
            if m.spec.pair_bound:
                assert pairs_within_bound(m.weight_codes(), 128), (extra, name)
                # the simulation multiplies the same limited codes
                scale = m.weight_scale.reshape(-1, *[1] * (m.layer.weight.dim() - 1))
                assert torch.allclose(m.quantized_weight(), m.weight_codes() * scale, atol=1e-6)


def _vpmaddubsw_matmul(a_u8: np.ndarray, w_s8: np.ndarray) -> tuple[np.ndarray, int]:
    """a (N, K) uint8 times w (M, K) int8 as AVX2's VPMADDUBSW + VPMADDWD do it: adjacent products summed
    in int16 with saturation, then in int32. Returns the result and how many pair sums saturated."""
    k = a_u8.shape[1] + a_u8.shape[1] % 2
    a = np.pad(a_u8.astype(np.int32), ((0, 0), (0, k - a_u8.shape[1])))
    w = np.pad(w_s8.astype(np.int32), ((0, 0), (0, k - w_s8.shape[1])))
    prods = a[:, None, :] * w[None, :, :]  # (N, M, K)
    pairs = prods[..., 0::2] + prods[..., 1::2]
    saturated = int(((pairs > INT16_MAX) | (pairs < -INT16_MAX - 1)).sum())
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(-1), saturated


def test_avx2_kernel_emulation_is_exact_only_with_the_pair_limit(trained_mlp):
    """The first layer of an MLP on inputs that put every activation code at 255: the emulated AVX2
    kernel equals exact int32 arithmetic with portable weights and differs with full 8-bit weights."""
    task = sk.data.digits(flatten=True)
    for target, exact in (("portable", True), ("x86-vnni", False)):
        q = sk.quantize(trained_mlp, QuantConfig(target=target, speed_check=False), task=task)
        layer = next(iter(weight_layers(q).values()))
        w = layer.weight_codes().numpy().astype(np.int8)
        a = np.full((4, w.shape[1]), 255, dtype=np.uint8)  # the top of the activation range
        a[1, ::3] = 0
        emulated, saturated = _vpmaddubsw_matmul(a, w)
        reference = a.astype(np.int64) @ w.T.astype(np.int64)
        assert (saturated == 0) == exact, (target, saturated)
        assert np.array_equal(emulated, reference) == exact, target


def test_ort_fused_kernels_match_the_simulation_at_the_top_of_the_range(quantized, digits_task, tmp_path):
    """Inputs scaled past the calibration range drive activations to the top code; with portable weights
    ONNX Runtime's fused int8 kernels follow slimkit's simulation on any x86 or ARM CPU."""
    q = quantized["portable"]
    path = export_quantized(q, tmp_path / "p.onnx", digits_task.example_input(1))
    for gain in (1.0, 3.0, 8.0):
        x = digits_task.example_input(64) * gain
        parity = check_parity(q, path, x)
        assert parity["top1_agreement"] == 1.0, (gain, parity)
        assert parity["max_abs_diff"] < 2e-2 * parity["output_std"], (gain, parity)


def test_files_written_before_target_keep_their_full_grid(quantized, digits_task, tmp_path):
    """A quantized model saved before `target` existed (no target, no weight_grid) reloads with the full
    8-bit grid it was made with, not the new default's pair limit."""
    q = quantized["x86-vnni"]
    path = sk.save(q, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["slimkit"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    stage = manifest["stages"][-1]
    del stage["config"]["target"], stage["structure"]["weight_grid"]
    old = save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"slimkit": json.dumps(manifest)})
    assert old is None
    x = digits_task.example_input(32)
    with torch.no_grad():
        assert torch.allclose(sk.load(tmp_path / "old.safetensors")(x), q(x), atol=1e-5)
        assert torch.allclose(sk.load(path)(x), q(x), atol=1e-5)
        portable = quantized["portable"]
        assert torch.allclose(sk.load(sk.save(portable, tmp_path / "p.safetensors"))(x), portable(x), atol=1e-5)


def test_weight_only_and_int16_keep_their_grid():
    """Only weights that meet 8-bit activations in integer kernels are limited."""
    assert QuantConfig().weight_spec().pair_bound == 128 and QuantConfig().weight_spec().qmin == -128
    assert QuantConfig(mode="dynamic").weight_spec().pair_bound == 128
    assert QuantConfig(target="arm64").weight_spec().pair_bound is None
    assert QuantConfig(activations="none").weight_spec().pair_bound is None  # weight-only: float matmul
    assert QuantConfig(weights="int16", activations="int16").weight_spec().qmin == -32768
    with pytest.raises(sk.errors.ConfigError):
        QuantConfig(target="x86-sse")


def test_depthwise_convolutions_keep_the_full_grid(digits_task, tmp_path):
    """ONNX Runtime's depthwise int8 kernel accumulates full products in int32 (no pair sums), so portable
    files keep unlimited 8-bit depthwise weights and limit only the layers that run through the u8 x s8
    GEMM (the stem's 3x3 on one input channel: the 7-bit grid)."""
    from slimkit.quantize.graph import is_depthwise
    from slimkit.quantize.numerics import pairs_within_bound

    model = sk.zoo.for_task("mobilenetv2_small", digits_task, seed=0)
    q = sk.quantize(model, QuantConfig(calibration_samples=64, speed_check=False), task=digits_task)
    layers = weight_layers(q)
    depthwise = {n for n, m in layers.items() if is_depthwise(m.layer)}
    assert depthwise and len(depthwise) < len(layers)
    for name, m in layers.items():
        codes = m.weight_codes()
        if name in depthwise:
            assert m.spec.pair_bound is None and m.spec.qmin == -128 and codes.abs().max() > 64, name
        elif m.spec.grid_bits:  # KxK with an odd channel count
            assert m.layer.in_channels % 2 and codes.abs().max() <= 64, name
        else:
            assert m.spec.pair_bound == 128 and pairs_within_bound(codes, 128), name
    assert any("depthwise convolution(s) keep the full grid" in n for n in q.slimkit_notes)
    path = export_quantized(q, tmp_path / "mbv2.onnx", digits_task.example_input(1))
    parity = check_parity(q, path, digits_task.example_input(32) * 3.0)
    assert parity["top1_agreement"] == 1.0

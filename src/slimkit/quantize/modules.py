"""Quantized modules: activation quantizers and weight-quantized Conv/Linear wrappers (embedding tables:
`quantize/embedding.py`).

In PyTorch they *simulate* integer arithmetic exactly (fake quantization); under `torch.onnx.export`
they emit ONNX QuantizeLinear/DequantizeLinear (QDQ) nodes with slimkit's own scales and zero points,
integer weight initializers and int32 biases, which ONNX Runtime fuses into int8 kernels
(QLinearConv, QGemm, QLinearAdd ...). Dynamic quantization emits DynamicQuantizeLinear +
MatMulInteger, which ONNX Runtime fuses into DynamicQuantizeMatMul. Under `torch.export` (inside
`pt2_export_mode`, for ExecuTorch and LiteRT) they emit PyTorch's `quantized_decomposed` Q/DQ ops with the
same scales, zero points and integer weight codes: the graph PT2E's `convert_pt2e` produces, which the
runtimes' lowerings turn into int8 kernels.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.quantize import numerics as nq

# ONNX/torch integer dtypes of the deployable types; other bit widths are simulation only.
_TORCH_DTYPE = {(8, True): torch.int8, (8, False): torch.uint8, (16, True): torch.int16}


def deployable(spec: nq.QuantSpec) -> bool:
    """True when ONNX Runtime has an integer type for this spec (int8, uint8, int16)."""
    return (spec.bits, spec.signed) in _TORCH_DTYPE and spec.granularity != "group"


def nbits_exportable(layer: nn.Module) -> bool:
    """True for an int4 weight-only Linear with symmetric per-group scales whose group size is a power
    of two >= 16: ONNX Runtime runs it as `com.microsoft::MatMulNBits` (4-bit weights in blocks along
    the input dimension, one scale per block)."""
    if not isinstance(layer, QuantLinear):
        return False
    s = layer.spec  # a per-group spec already divides in_features (checked when the layer is built)
    return (s.bits == 4 and s.signed and s.symmetric and s.granularity == "group" and s.group_size >= 16
            and s.group_size & (s.group_size - 1) == 0 and not layer.dynamic
            and layer.input_quant is None and layer.input_owned is None)


class _MatMulNBits(torch.autograd.Function):
    """y = x W^T with W stored as packed 4-bit codes and per-block scales; exports as MatMulNBits.
    The float `weight` (the dequantized codes) only serves PyTorch's trace and is not in the graph."""

    @staticmethod
    def forward(ctx, x, weight, packed, scales, k, n, block):
        return F.linear(x, weight)

    @staticmethod
    def symbolic(g, x, weight, packed, scales, k, n, block):
        from torch.onnx import symbolic_helper as sh

        k, n, block = (sh._get_const(v, "i", name) for v, name in ((k, "K"), (n, "N"), (block, "block_size")))
        return g.op("com.microsoft::MatMulNBits", x, packed, scales, K_i=k, N_i=n, bits_i=4, block_size_i=block)


def _domain(spec: nq.QuantSpec) -> str:
    # int16 Q/DQ exist in the standard domain only from opset 21; ONNX Runtime's contrib ops take them earlier
    return "com.microsoft::" if spec.bits == 16 else ""


class _QDQ(torch.autograd.Function):
    """Quantize-dequantize that exports as an ONNX QuantizeLinear/DequantizeLinear pair."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):  # noqa: D401
        return nq.dequantize(nq.quantize(x, scale, zero_point.long(), spec), scale, zero_point.long(), spec)

    @staticmethod
    def symbolic(g, x, scale, zero_point, spec):
        kw = {"axis_i": spec.axis} if spec.granularity == "channel" else {}
        dom = _domain(spec)
        q = g.op(f"{dom}QuantizeLinear", x, scale, zero_point, **kw)
        return g.op(f"{dom}DequantizeLinear", q, scale, zero_point, **kw)


class _DQ(torch.autograd.Function):
    """Dequantize integer codes (weights, int32 biases); exports as DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, spec):
        return nq.dequantize(q.long(), scale, zero_point.long(), spec)

    @staticmethod
    def symbolic(g, q, scale, zero_point, spec):
        kw = {"axis_i": spec.axis} if spec.granularity == "channel" else {}
        return g.op(f"{_domain(spec)}DequantizeLinear", q, scale, zero_point, **kw)


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A (B, T, D) tensor at the real tokens of a (B, T) attention mask, as (n, D); any other x as it is."""
    return x[mask] if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape else x


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ONNX DynamicQuantizeLinear (uint8, range widened to contain 0)."""
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zp


class _DynamicLinear(torch.autograd.Function):
    """y = x W^T + b with x quantized per batch to uint8 and W int8: exports as
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (ONNX Runtime: DynamicQuantizeMatMul)."""

    @staticmethod
    def forward(ctx, x, w_int_t, w_scale, w_zp, bias):
        s, z = dynamic_qparams(x)
        xq = torch.clamp(torch.round(x / s) + z, 0, 255) - z
        w = w_int_t.float() - w_zp.float() if w_zp is not None else w_int_t.float()
        y = torch.matmul(xq, w) * (s * w_scale)
        return y + bias if bias is not None else y

    @staticmethod
    def symbolic(g, x, w_int_t, w_scale, w_zp, bias):
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        if w_zp is None or (hasattr(w_zp, "node") and w_zp.node().mustBeNone()):
            y = g.op("MatMulInteger", xq, w_int_t, xz)  # b_zero_point omitted: 0
        else:
            y = g.op("MatMulInteger", xq, w_int_t, xz, w_zp)
        y = g.op("Cast", y, to_i=1)  # 1 = FLOAT
        y = g.op("Mul", y, g.op("Mul", xs, w_scale))
        if bias is not None and not (hasattr(bias, "node") and bias.node().mustBeNone()):
            y = g.op("Add", y, bias)
        return y


_EXPORTING = False


def exporting() -> bool:
    """Whether the modules are being traced by `torch.onnx.export` (inside `onnx_export_mode`)."""
    return _EXPORTING


@contextmanager
def onnx_export_mode():
    """While active, quantized modules run through their ONNX-exportable path."""
    global _EXPORTING
    old, _EXPORTING = _EXPORTING, True
    try:
        yield
    finally:
        _EXPORTING = old


_PT2 = False


@contextmanager
def pt2_export_mode():
    """While active, quantized modules emit `quantized_decomposed` Q/DQ ops (for `torch.export`); the
    exporter sets `pt2_qparams` on the activation quantizers and freezes the weight layers first."""
    global _PT2
    old, _PT2 = _PT2, True
    try:
        yield
    finally:
        _PT2 = old


def pt2_grid(spec: nq.QuantSpec, zero_point: int) -> tuple[int, int, int]:
    """(zero point, qmin, qmax) of an 8-bit spec on the signed int8 grid the `quantized_decomposed` ops and
    the mobile runtimes use: uint8 codes move down by 128 with their zero point (the same real values)."""
    from slimkit.errors import UnsupportedLayerError

    if spec.bits != 8 or spec.granularity == "group":
        raise UnsupportedLayerError(f"{'int' if spec.signed else 'uint'}{spec.bits} {spec.granularity} quantization has no "
                                    "int8 kernel in ExecuTorch/LiteRT; export this model to ONNX")
    shift = 0 if spec.signed else -128
    return zero_point + shift, spec.qmin + shift, spec.qmax + shift


def _pt2_qdq(x: torch.Tensor, scale: float, zero_point: int, spec: nq.QuantSpec) -> torch.Tensor:
    z, lo, hi = pt2_grid(spec, zero_point)
    q = torch.ops.quantized_decomposed.quantize_per_tensor.default(x, scale, z, lo, hi, torch.int8)
    return torch.ops.quantized_decomposed.dequantize_per_tensor.default(q, scale, z, lo, hi, torch.int8)


def _lsq_scale(scale: torch.Tensor, numel: int, qmax: int) -> torch.Tensor:
    """LSQ gradient scaling (Esser et al. 2020): same value, gradient times 1/sqrt(N * qmax)."""
    g = 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))
    return (scale - scale * g).detach() + scale * g


class ActQuant(nn.Module):
    """Quantizer of one activation tensor.

    mode: "off" (identity; calibration observes it through a hook), "quant" (fake quant
    with the calibrated scale / zero point). `learnable()` turns the scale into an LSQ parameter (QAT).
    """

    def __init__(self, spec: nq.QuantSpec, name: str = "act"):
        super().__init__()
        self.spec = spec
        self.name = name
        self.mode = "off"
        self.register_buffer("scale", torch.tensor(1.0))
        zdtype = _TORCH_DTYPE.get((spec.bits, spec.signed), torch.int32)
        self.register_buffer("zero_point", torch.tensor(0, dtype=zdtype))

    def extra_repr(self) -> str:
        kind = f"{'int' if self.spec.signed else 'uint'}{self.spec.bits}"
        return f"{kind}, {'symmetric' if self.spec.symmetric else 'asymmetric'}, mode={self.mode}"

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zp = nq.qparams(lo, hi, self.spec)
        with torch.no_grad():
            if isinstance(self.scale, nn.Parameter):
                self.scale.data.copy_(scale)
            else:
                self.scale = scale.clone()
            self.zero_point = zp.to(self.zero_point.dtype)
        self.mode = "quant"

    def learnable(self) -> None:
        if not isinstance(self.scale, nn.Parameter):
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if _EXPORTING:
            return _QDQ.apply(x, self.scale.detach(), self.zero_point, self.spec)
        if _PT2:
            return _pt2_qdq(x, *self.pt2_qparams, self.spec)
        scale = self.scale
        if isinstance(scale, nn.Parameter):
            scale = _lsq_scale(scale.abs() + 1e-12, x[0].numel(), self.spec.qmax)
        return nq.fake_quantize(x, scale, self.zero_point, self.spec)


class QuantWeightLayer(nn.Module):
    """Shared logic of QuantConv / QuantLinear: the wrapped float layer, its weight quantizer and,
    for static activations, a link to its input quantizer (needed for the int32 bias scale)."""

    slimkit_wrapper = True  # `core.selector.select` never picks the float layer inside

    def __init__(self, layer: nn.Module, spec: nq.QuantSpec):
        super().__init__()
        self.layer = layer
        self.spec = spec
        zdtype = _TORCH_DTYPE.get((spec.bits, spec.signed), torch.int32)
        shape = self._scale_shape()
        self.register_buffer("weight_scale", torch.ones(shape))
        self.register_buffer("weight_zero_point", torch.zeros(shape, dtype=zdtype))
        self._input_quant: list[ActQuant] = []  # a plain list: referenced, not owned (owned by the graph)
        self.dynamic = False  # per-batch activation quantization (Linear only)
        self.enabled = True
        self.round_offset: torch.Tensor | None = None  # AdaRound: soft rounding while learning
        self.input_owned: ActQuant | None = None  # input quantizer when the graph could not be traced
        # and (convolutions) the output quantizer then: without one after it, ONNX Runtime runs the conv in float
        self.output_owned: ActQuant | None = None
        self.pt2_weight_qparams: tuple[float, int] | None = None  # per-tensor (scale, zero point) while frozen
        self.pt2_float_output = False  # see freeze_for_pt2

    def _scale_shape(self) -> tuple[int, ...]:
        w = self.layer.weight
        if self.spec.granularity == "channel":
            return (w.shape[self.spec.axis],)
        if self.spec.granularity == "group":
            return nq.grouped(w.detach(), self.spec.group_size).shape[:2]
        return ()

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def input_quant(self) -> ActQuant | None:
        return self._input_quant[0] if self._input_quant else None

    def link_input(self, quant: ActQuant | None) -> None:
        self._input_quant = [quant] if quant is not None else []

    def calibrate_weight(self, method: str = "minmax", percentile: float = 99.99) -> None:
        from slimkit.quantize.calibration import weight_thresholds

        lo, hi = weight_thresholds(self.layer.weight, method, self.spec, percentile=percentile)
        scale, zp = nq.qparams(lo, hi, self.spec)
        scale = nq.pair_scale(self.layer.weight, scale, zp, self.spec)  # no-op without a pair limit
        with torch.no_grad():
            if isinstance(self.weight_scale, nn.Parameter):
                self.weight_scale.data.copy_(scale)
            else:
                self.weight_scale = scale.reshape(self.weight_scale.shape).clone()
            self.weight_zero_point = zp.reshape(self.weight_zero_point.shape).to(self.weight_zero_point.dtype)

    def learnable(self) -> None:
        if not isinstance(self.weight_scale, nn.Parameter):
            scale = self.weight_scale.detach().clone()
            del self.weight_scale
            self.weight_scale = nn.Parameter(scale)

    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes (int64) as deployed."""
        return nq.quantize(self.layer.weight.detach(), self.weight_scale.detach(), self.weight_zero_point, self.spec)

    def quantized_weight(self) -> torch.Tensor:
        """The simulated (dequantized) weight; differentiable for QAT and AdaRound."""
        w = self.layer.weight
        if not self.enabled:
            return w
        scale = self.weight_scale
        if isinstance(scale, nn.Parameter):
            scale = _lsq_scale(scale.abs() + 1e-12, w[0].numel(), self.spec.qmax)
        if self.round_offset is not None:  # AdaRound: floor + learned offset in [0, 1]
            if self.spec.granularity == "group":
                raise NotImplementedError("AdaRound supports per-channel or per-tensor scales")
            s = nq.broadcast(scale, w, self.spec)
            z = nq.broadcast(self.weight_zero_point, w, self.spec).float()
            q = torch.clamp(torch.floor(w / s).detach() + self.round_offset + z, self.spec.qmin, self.spec.qmax)
            if self.spec.pair_bound:
                q = nq.pair_limited(q, self.spec.pair_bound)
            return (q - z) * s
        return nq.fake_quantize(w, scale, self.weight_zero_point, self.spec)

    def quantized_bias(self, weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bias rounded to int32 with scale s_in * s_w (as ONNX Runtime's integer kernels use it)."""
        b = self.layer.bias
        iq = self.input_quant
        if b is None or iq is None or iq.mode != "quant" or not self.enabled or self.spec.granularity == "group":
            return b
        s = (iq.scale.detach() if weight_scale is None else iq.scale) * (self.weight_scale if weight_scale is None else weight_scale)
        s = s.detach().abs() + 1e-20
        return nq.round_ste(b / s) * s

    # -- export ------------------------------------------------------------------------------
    # Integer codes are materialized as (non-persistent) buffers before tracing, so the exporter
    # writes them as int8/int32 initializers instead of tracing the float->int computation.
    def freeze_for_export(self) -> None:
        if nbits_exportable(self):  # 4-bit codes as unsigned nibbles (zero point 8), two per byte, low first
            n, k = self.layer.weight.shape
            u = (self.weight_codes() + 8).to(torch.uint8).reshape(n, k // self.spec.group_size, self.spec.group_size)
            self.register_buffer("export_nbits_packed", (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous(),
                                 persistent=False)
            self.register_buffer("export_nbits_scales", self.weight_scale.detach().float().reshape(-1).clone(),
                                 persistent=False)
            return
        codes = self.weight_codes().to(self.weight_zero_point.dtype)
        self.register_buffer("export_weight_codes", codes, persistent=False)
        self.register_buffer("export_weight_scale", self.weight_scale.detach().float().clone(), persistent=False)
        b, iq = self.layer.bias, self.input_quant
        if b is not None and iq is not None and iq.mode == "quant":
            s = (iq.scale.detach() * self.weight_scale.detach()).float().reshape(-1).expand(b.shape[0]).contiguous()
            self.register_buffer("export_bias_codes", torch.round(b.detach() / s).to(torch.int32), persistent=False)
            self.register_buffer("export_bias_scale", s.clone(), persistent=False)
            self.register_buffer("export_bias_zero_point", torch.zeros(b.shape[0], dtype=torch.int32), persistent=False)

        if self.dynamic:  # MatMulInteger takes B as (in, out)
            self.register_buffer("export_weight_codes_t", codes.t().contiguous(), persistent=False)

    def unfreeze(self) -> None:
        for name in ("export_weight_codes", "export_weight_codes_t", "export_weight_scale", "export_bias_codes", "export_bias_scale",
                     "export_bias_zero_point", "export_nbits_packed", "export_nbits_scales",
                     "export_pt2_codes", "export_pt2_zero_points", "export_pt2_bias", "export_pt2_unfolded"):
            self._buffers.pop(name, None)
        self.pt2_weight_qparams = None
        self.pt2_float_output = False

    def _export_weight(self) -> torch.Tensor:
        return _DQ.apply(self.export_weight_codes, self.export_weight_scale, self.weight_zero_point, self.spec)

    def _export_bias(self) -> torch.Tensor | None:
        if _PT2:  # float, as PT2E leaves it: the runtime rounds it to int32 with s_in * s_w, recovering the codes
            return self.export_pt2_bias
        if "export_bias_codes" not in self._buffers:
            return self.layer.bias
        return _DQInt32.apply(self.export_bias_codes, self.export_bias_scale, self.export_bias_zero_point)

    def freeze_for_pt2(self, folded: bool = True, float_output: bool = False) -> None:
        """The constants of the `quantized_decomposed` graph: int8 codes, zero points on the int8 grid, the
        float bias the runtime rounds back to the same int32 codes. `folded=False`: the dequantized codes
        quantized again in the graph (PT2E's `fold_quantize=False` form, which LiteRT's converter folds;
        exact: the codes come back unchanged). `float_output`: the layer's output is not quantized again
        (XNNPACK has no static int8 kernel returning float, and ExecuTorch 1.5.1's partitioner mis-runs such a
        layer inside an int8 partition: the codes used as float weights). Its input is then quantized per
        call (`choose_qparams`), XNNPACK's dynamically quantized kernel, the weights still int8: the one place a
        .pte departs from the simulation (the input was on its static grid already; measured in
        docs/deployment.md)."""
        self.freeze_for_export()
        shift, lo, hi = pt2_grid(self.spec, 0)
        codes, bias = self._buffers.pop("export_weight_codes"), None
        if "export_bias_codes" in self._buffers:
            bias = self._buffers.pop("export_bias_codes").float() * self._buffers.pop("export_bias_scale")
            self._buffers.pop("export_bias_zero_point")
        if bias is None and self.layer.bias is not None:
            bias = self.layer.bias.detach().clone()
        self.register_buffer("export_pt2_bias", bias, persistent=False)
        self.pt2_float_output = float_output
        if folded:
            self.register_buffer("export_pt2_codes", (codes.to(torch.int16) + shift).to(torch.int8), persistent=False)
        else:
            real = nq.dequantize(codes.long(), self.weight_scale.detach(), self.weight_zero_point.long(), self.spec)
            self.register_buffer("export_pt2_unfolded", real.float(), persistent=False)
        self.register_buffer("export_pt2_zero_points", self.weight_zero_point.long() + shift, persistent=False)
        if self.spec.granularity == "tensor":
            self.pt2_weight_qparams = (float(self.weight_scale), int(self.weight_zero_point) + shift)

    def _pt2_weight(self) -> torch.Tensor:
        """The integer weight codes dequantized by a `quantized_decomposed` op (int8 grid)."""
        dq = torch.ops.quantized_decomposed
        _, lo, hi = pt2_grid(self.spec, 0)
        unfolded = self._buffers.get("export_pt2_unfolded")
        if self.pt2_weight_qparams is not None:
            scale, zp = self.pt2_weight_qparams
            codes = self.export_pt2_codes if unfolded is None else \
                dq.quantize_per_tensor.default(unfolded, scale, zp, lo, hi, torch.int8)
            return dq.dequantize_per_tensor.default(codes, scale, zp, lo, hi, torch.int8)
        scale, zps, axis = self.export_weight_scale.float(), self.export_pt2_zero_points, self.spec.axis
        codes = self.export_pt2_codes if unfolded is None else \
            dq.quantize_per_channel.default(unfolded, scale, zps, axis, lo, hi, torch.int8)
        return dq.dequantize_per_channel.default(codes, scale, zps, axis, lo, hi, torch.int8)

    def _weight_for_export(self) -> torch.Tensor:
        return self._pt2_weight() if _PT2 else self._export_weight()

    def _input_for_export(self, x: torch.Tensor) -> torch.Tensor:
        if not (_PT2 and self.pt2_float_output):
            return x
        if isinstance(self, QuantConv):  # no dynamic int8 conv in XNNPACK: keep it out (portable kernels, exact)
            return x.clone()
        # XNNPACK's dynamically quantized kernel (int8 input quantized per call x int8 weights -> float)
        ops = torch.ops.quantized_decomposed
        scale, zero = ops.choose_qparams.tensor(x, -128, 127, 2.0 ** -12, torch.int8)
        q = ops.quantize_per_tensor.tensor(x, scale, zero, -128, 127, torch.int8)
        return ops.dequantize_per_tensor.tensor(q, scale, zero, -128, 127, torch.int8)


class _DQInt32(torch.autograd.Function):
    """Per-channel int32 bias codes with scale s_in * s_w; exports as DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx, q, scale, zero_point):
        return q.float() * scale

    @staticmethod
    def symbolic(g, q, scale, zero_point):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


def conv_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Run a Conv1d/Conv2d (or a subclass) with replacement weight and bias."""
    if type(layer).forward in (nn.Conv1d.forward, nn.Conv2d.forward):
        return layer._conv_forward(x, weight, bias)
    pad = getattr(layer, "static_padding", None)
    if isinstance(pad, nn.Module):  # TF-"SAME" padded convs (EfficientNet ports): pad, then a plain conv
        return layer._conv_forward(pad(x), weight, bias)
    from torch.func import functional_call  # any other subclass: its own forward with swapped tensors

    params = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    return functional_call(layer, params, (x,))


class QuantConv(QuantWeightLayer):
    """A Conv1d/Conv2d (or subclass) with quantized weights (and int32 bias under static activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_owned is not None:
            x = self.input_owned(x)
        if (_EXPORTING or _PT2) and self.enabled and deployable(self.spec):
            y = conv_forward(self.layer, self._input_for_export(x), self._weight_for_export(), self._export_bias())
        else:
            y = conv_forward(self.layer, x, self.quantized_weight(), self.quantized_bias())
        return self.output_owned(y) if self.output_owned is not None else y


class QuantLinear(QuantWeightLayer):
    """A Linear with quantized weights; `dynamic=True` also quantizes its input per batch (uint8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_owned is not None:
            x = self.input_owned(x)
        if self.dynamic and self.enabled:
            if _EXPORTING and self.spec.bits == 8:
                zp = self.weight_zero_point  # symmetric weights: MatMulInteger's default zero point, not in the file
                return _DynamicLinear.apply(x, self.export_weight_codes_t, self.export_weight_scale,
                                            None if not bool(zp.any()) else zp, self.layer.bias)
            w = self.quantized_weight()
            s, z = dynamic_qparams(x)
            xq = (torch.clamp(nq.round_ste(x / s) + z, 0, 255) - z) * s
            return F.linear(xq, w, self.layer.bias)
        if _EXPORTING and self.enabled and nbits_exportable(self):
            n, k = self.layer.weight.shape
            y = _MatMulNBits.apply(x, self.quantized_weight().detach(), self.export_nbits_packed,
                                   self.export_nbits_scales, k, n, self.spec.group_size)
            return y if self.layer.bias is None else y + self.layer.bias
        if (_EXPORTING or _PT2) and self.enabled and deployable(self.spec):
            return F.linear(self._input_for_export(x), self._weight_for_export(), self._export_bias())
        return F.linear(x, self.quantized_weight(), self.quantized_bias())

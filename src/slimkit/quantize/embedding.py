"""Quantized embedding tables (`nn.Embedding` -> `QuantEmbedding`): int8/int16 codes with one scale per row,
or 4-bit blocks. In PyTorch they simulate the rounding of the rows a batch looks up; under
`torch.onnx.export` they emit Gather on the integer table followed by the scale (Gather -> Cast -> Mul), or
ONNX Runtime's GatherBlockQuantized for 4-bit blocks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.quantize import numerics as nq
from slimkit.quantize.modules import exporting


def gather_block_exportable(spec: nq.QuantSpec) -> bool:
    """True for a 4-bit table with symmetric per-group scales whose group size is a power of two >= 16:
    ONNX Runtime gathers it packed with `com.microsoft::GatherBlockQuantized`."""
    return (spec.bits == 4 and spec.signed and spec.granularity == "group" and spec.group_size >= 16
            and spec.group_size & (spec.group_size - 1) == 0)


def fp16_scales(scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales rounded up to the nearest float16 value (so no row's largest value is clipped; a scale
    below float16's smallest becomes that), as float32: the file then stores them in half the bytes. Beyond
    float16's range (never seen in an embedding) the scales stay float32."""
    up = scale.half()
    up = torch.where(up.float() < scale, torch.nextafter(up, torch.tensor(float("inf"), dtype=torch.half)), up)
    return up.float() if bool(torch.isfinite(up).all()) else scale


class _GatherDQ(torch.autograd.Function):
    """Rows of an integer table times their per-row scale: exports as Gather(codes) -> Cast -> Mul(Cast(Gather(scales))),
    standard ONNX ops every runtime has (the table stays integer in the file and in memory; the scales are
    float16 where every one is a float16 value, as calibration makes them)."""

    @staticmethod
    def forward(ctx, ids, codes, scale):
        return codes[ids].float() * scale[ids].float()

    @staticmethod
    def symbolic(g, ids, codes, scale):
        rows = g.op("Cast", g.op("Gather", codes, ids, axis_i=0), to_i=1)  # 1 = FLOAT
        return g.op("Mul", rows, g.op("Cast", g.op("Gather", scale, ids, axis_i=0), to_i=1))


class _GatherBlockQuantized(torch.autograd.Function):
    """Rows of a 4-bit table packed two per byte with per-block scales: exports as GatherBlockQuantized.
    `table` (the dequantized codes) only serves PyTorch's trace and is not in the graph."""

    @staticmethod
    def forward(ctx, ids, table, packed, scales, block):
        return table[ids]

    @staticmethod
    def symbolic(g, ids, table, packed, scales, block):
        from torch.onnx import symbolic_helper as sh

        block = sh._get_const(block, "i", "block_size")
        return g.op("com.microsoft::GatherBlockQuantized", packed, ids, scales, bits_i=4, block_size_i=block,
                    gather_axis_i=0, quantize_axis_i=1)


class QuantEmbedding(nn.Module):
    """An `nn.Embedding` whose table is quantized: symmetric codes with one scale per row (per group of
    `spec.group_size` elements of a row for 4-bit groups). Only the rows a batch looks up are
    dequantized. Exports as Gather of the integer codes then the row scale (int8 / int16 codes;
    other widths below 8 bits are stored in int8), or, for 4-bit groups, ONNX Runtime's
    GatherBlockQuantized on the packed nibbles."""

    slimkit_wrapper = True  # `core.selector.select` never picks the float table inside

    def __init__(self, layer: nn.Embedding, spec: nq.QuantSpec):
        super().__init__()
        self.layer = layer
        self.spec = spec
        n, d = layer.weight.shape
        self.register_buffer("weight_scale", torch.ones((n, d // spec.group_size) if spec.granularity == "group" else (n,)))

    def extra_repr(self) -> str:
        per = f"per {self.spec.group_size} of a row" if self.spec.granularity == "group" else "per row"
        return f"int{self.spec.bits}, one scale {per}"

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def calibrate_weight(self, method: str = "minmax", percentile: float = 99.99) -> None:
        from slimkit.quantize.calibration import weight_thresholds

        lo, hi = weight_thresholds(self.layer.weight, method, self.spec, percentile=percentile)
        scale, _ = nq.qparams(lo, hi, self.spec)
        if self.spec.granularity != "group":  # per-row scales are stored as float16 in the file
            scale = fp16_scales(scale)
        self.weight_scale = scale.reshape(self.weight_scale.shape).clone()

    def _zero_point(self) -> torch.Tensor:
        return torch.zeros(self.weight_scale.shape, dtype=torch.int64)

    def weight_codes(self) -> torch.Tensor:
        """Integer codes of the whole table (int64) as deployed."""
        return nq.quantize(self.layer.weight.detach(), self.weight_scale, self._zero_point(), self.spec)

    def quantized_weight(self) -> torch.Tensor:
        """The whole dequantized table (what the lookups return rows of)."""
        return nq.dequantize(self.weight_codes(), self.weight_scale, self._zero_point(), self.spec)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if exporting():
            if "export_packed" in self._buffers:
                return _GatherBlockQuantized.apply(ids, self.export_table, self.export_packed, self.weight_scale,
                                                   self.spec.group_size)
            scale = self.weight_scale.reshape(-1, 1)
            if bool((scale.half().float() == scale).all()):  # calibrated by this release: float16 values
                scale = scale.half()
            return _GatherDQ.apply(ids, self.export_codes, scale)
        rows = F.embedding(ids, self.layer.weight, self.layer.padding_idx)
        s = self.weight_scale[ids].unsqueeze(-1)  # (..., 1) per row, (..., groups, 1) per group
        if self.spec.granularity == "group":
            rows = rows.reshape(*rows.shape[:-1], -1, self.spec.group_size)
        q = torch.clamp(nq.round_ste(rows / s), self.spec.qmin, self.spec.qmax) * s
        return q.reshape(*ids.shape, -1)

    def freeze_for_export(self) -> None:
        codes = self.weight_codes()
        if gather_block_exportable(self.spec):  # unsigned nibbles (zero point 8), two per byte, low first
            u = (codes + 8).to(torch.uint8)
            self.register_buffer("export_packed", (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), persistent=False)
            self.register_buffer("export_table", self.quantized_weight(), persistent=False)
            return
        dtype = torch.int8 if self.spec.bits <= 8 else torch.int16
        self.register_buffer("export_codes", codes.to(dtype), persistent=False)

    def unfreeze(self) -> None:
        for name in ("export_codes", "export_packed", "export_table"):
            self._buffers.pop(name, None)

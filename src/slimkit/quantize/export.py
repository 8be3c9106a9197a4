"""ONNX export of quantized models (QDQ with slimkit's own scales) and the parity check against
the PyTorch simulation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit.export.onnx import export_onnx
from slimkit.quantize.modules import deployable, nbits_exportable, onnx_export_mode


def export_quantized(model: nn.Module, path: str | Path, example_input: Any, *, opset: int = 17, **kw: Any) -> Path:
    """Write the quantized model as ONNX: integer weight initializers + DequantizeLinear, int32 biases,
    QuantizeLinear/DequantizeLinear pairs on activations (int16 through ONNX Runtime's com.microsoft
    ops), DynamicQuantizeLinear + MatMulInteger for dynamic layers, MatMulNBits for int4 weight-only
    Linear layers with per-group scales, Gather of integer codes (or GatherBlockQuantized) for embedding
    tables. Atomic, one self-contained file."""
    from slimkit.quantize.graph import embedding_tables, weight_layers

    layers = [m for m in weight_layers(model).values() if m.enabled and (deployable(m.spec) or nbits_exportable(m))]
    layers += list(embedding_tables(model).values())
    for layer in layers:
        layer.freeze_for_export()
    try:
        with onnx_export_mode():
            return export_onnx(model, path, example_input, opset=opset, **kw)
    finally:
        for layer in layers:
            layer.unfreeze()


def check_parity(model: nn.Module, path: str | Path, example_input: Any, threads: int = 1) -> dict[str, float]:
    """How closely ONNX Runtime's integer execution of `path` follows slimkit's simulation on the same
    inputs: max/mean absolute difference, the output's quantization-free scale (std) for context,
    and top-1 agreement for classifiers (`export.runtimes.check_parity`, which serves every runtime)."""
    from slimkit.export.runtimes import check_parity as runtime_parity

    return runtime_parity(model, path, example_input, threads)


def optimized_graph(path: str | Path):
    """The onnx GraphProto ONNX Runtime actually runs for `path` (after its fusions, e.g. QDQ into int8 kernels)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath).graph


def onnx_op_counts(path: str | Path, *, optimized: bool = True) -> dict[str, int]:
    """Node types of the graph ONNX Runtime actually runs (after its QDQ fusions) or of the file."""
    import collections

    import onnx

    graph = optimized_graph(path) if optimized else onnx.load(str(path)).graph
    return dict(collections.Counter(n.op_type for n in graph.node))

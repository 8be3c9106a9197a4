"""LiteRT export (`.tflite`, formerly TensorFlow Lite) and its runner.

    slimkit.export(model, "model.tflite", example_input=task.example_input(1))

Converted by `litert-torch` (no TensorFlow). Float models become float32 programs. A slimkit-quantized
model is captured with its own scales, zero points and weight codes (`export/pt2.py`, the weights in
PT2E's unfolded Q/DQ form, which the converter folds into int8 tensors) and converted in LiteRT's static
int8 mode: int8 conv / fully-connected / pooling kernels with slimkit's numbers, not a re-quantization.
A quantized layer whose output stays float (the classifier's logits) has no static int8 kernel in LiteRT:
the converter runs it in float and stores its weights as float32 (for EfficientNet-Lite0 a quarter of the
weights, half the file). slimkit then writes those weights back as their int8 codes followed by a
DEQUANTIZE (LiteRT's weight-only form, `int8_weights`): the same values, computed as the simulation does,
in a quarter of the bytes.
The converter makes a quantized program's first input int8 (the model's input quantizer folded in):
`LiteRTRunner` quantizes float inputs with that tensor's scale and zero point, as an app would.
Static shapes (the example's). Needs `litert-torch` and `ai-edge-litert` (in requirements.lock).
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from slimkit.core.io import atomic_path, quiet_native_logs
from slimkit.errors import MissingDependencyError, ModelError, UnsupportedLayerError


def _litert_torch():
    try:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer, quant_config
    except ImportError as err:
        raise MissingDependencyError(f"LiteRT export needs the litert-torch package ({err}); `make venv` installs it") from None
    return litert_torch, pt2e_quantizer, quant_config


def export_litert(model: nn.Module, path: str | Path, example_input: Any) -> Path:
    """Write `model` as a LiteRT flatbuffer for `example_input`'s shape; returns the path."""
    from slimkit.export.pt2 import capture
    from slimkit.quantize.apply import is_quantized

    litert_torch, pq, qc = _litert_torch()
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    quantized = is_quantized(model)
    module = capture(model, args, folded=False).module() if quantized else model.eval().cpu()
    config = None
    if quantized:  # the quantizer only tells the converter "static Q/DQ"; it quantizes nothing here
        config = qc.QuantConfig(pt2e_quantizer=pq.PT2EQuantizer().set_global(
            pq.get_symmetric_quantization_config(is_per_channel=True)))
    path = Path(path)
    litert_torch.config.show_progress = False
    try:
        with quiet_native_logs():
            converted = litert_torch.convert(module, args, quant_config=config)
    except Exception as err:
        raise UnsupportedLayerError(f"LiteRT conversion of {type(model).__name__} failed: {str(err).splitlines()[0]}") from None
    with atomic_path(path) as tmp, quiet_native_logs():
        converted.export(str(tmp))
        if quantized:
            tmp.write_bytes(int8_weights(tmp.read_bytes(), _layer_codes(model)))
    return path


def _layer_codes(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(int8 codes, scales, dequantized values) of every 8-bit quantized weight layer with symmetric
    (zero-point 0) per-channel or per-tensor scales along the output channels (what LiteRT can store)."""
    import torch

    from slimkit.quantize import numerics as nq
    from slimkit.quantize.graph import weight_layers
    from slimkit.quantize.modules import pt2_grid

    found = []
    for m in weight_layers(model).values():
        if not m.enabled or m.dynamic or m.spec.bits != 8 or m.spec.granularity == "group" or m.spec.axis != 0:
            continue
        shift = pt2_grid(m.spec, 0)[0]
        with torch.no_grad():
            codes = m.weight_codes()
            zero = m.weight_zero_point.long() + shift
            if bool((zero != 0).any()):
                continue
            real = nq.dequantize(codes, m.weight_scale, m.weight_zero_point.long(), m.spec)
        found.append(((codes + shift).to(torch.int8).numpy(), m.weight_scale.detach().float().reshape(-1).numpy(),
                      real.float().numpy()))
    return found


def int8_weights(data: bytes, layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
    """The flatbuffer `data` with every float32 constant that holds one of `layers`' dequantized weights
    (as PyTorch lays it out, or OHWI for a convolution) stored as its int8 codes with the layer's scales,
    read through a DEQUANTIZE op placed before its first consumer. Returns `data` unchanged if none."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    by_shape: dict[tuple, list] = collections.defaultdict(list)
    for codes, scales, real in layers:
        by_shape[real.shape].append((codes, scales, real))
        if real.ndim == 4:  # conv weights OIHW -> OHWI
            by_shape[real.transpose(0, 2, 3, 1).shape].append(
                (codes.transpose(0, 2, 3, 1), scales, real.transpose(0, 2, 3, 1)))
    model = fb.ModelT.InitFromPackedBuf(data, 0)
    dequantize = next((i for i, c in enumerate(model.operatorCodes) if c.builtinCode == fb.BuiltinOperator.DEQUANTIZE), None)
    changed = 0
    for graph in model.subgraphs:
        for index, tensor in enumerate(list(graph.tensors)):
            buffer = model.buffers[tensor.buffer] if tensor.buffer else None
            shape = tuple(int(d) for d in tensor.shape) if tensor.shape is not None else ()
            if tensor.type != fb.TensorType.FLOAT32 or buffer is None or buffer.data is None or shape not in by_shape:
                continue
            values = np.frombuffer(np.asarray(buffer.data, dtype=np.uint8).tobytes(), dtype=np.float32).reshape(shape)
            match = next((m for m in by_shape[shape] if np.allclose(values, m[2], rtol=1e-6, atol=1e-12)), None)
            users = [i for i, op in enumerate(graph.operators) if op.inputs is not None and index in op.inputs]
            if match is None or not users:
                continue
            codes, scales, _ = match
            if dequantize is None:
                code = fb.OperatorCodeT()
                code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.DEQUANTIZE
                code.version = 5 if scales.size > 1 else 2  # int8 input per channel / per tensor
                model.operatorCodes.append(code)
                dequantize = len(model.operatorCodes) - 1
            stored = fb.BufferT()
            stored.data = np.ascontiguousarray(codes).view(np.uint8).reshape(-1)
            model.buffers.append(stored)
            quant = fb.QuantizationParametersT()
            quant.scale = [float(s) for s in scales]
            quant.zeroPoint = [0] * scales.size
            quant.quantizedDimension = 0
            weight = fb.TensorT()
            weight.shape, weight.type, weight.buffer = list(shape), fb.TensorType.INT8, len(model.buffers) - 1
            weight.name, weight.quantization = (tensor.name or b"weight") + b"_int8", quant
            graph.tensors.append(weight)
            buffer.data, tensor.buffer = None, 0  # the float tensor is now computed, not stored
            op = fb.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = dequantize, [len(graph.tensors) - 1], [index]
            graph.operators.insert(users[0], op)
            changed += 1
    if not changed:
        return data
    builder = flatbuffers.Builder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _interpreter(path: str | Path, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as err:
        raise MissingDependencyError(f"running .tflite needs the ai-edge-litert package ({err})") from None
    try:
        with quiet_native_logs():
            return Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as err:
        raise ModelError(f"{Path(path).name}: not a loadable LiteRT model ({str(err).splitlines()[0]})") from None


def op_counts(path: str | Path) -> dict[str, int]:
    """LiteRT operators of the program with their counts, each tagged with its tensor type
    (e.g. "CONV_2D int8", "FULLY_CONNECTED float32")."""
    it = _interpreter(path, 1)
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    counts: collections.Counter = collections.Counter()
    for op in it._get_ops_details():
        ins = [i for i in op["inputs"] if i >= 0]
        dtype = np.dtype(tensors[ins[0]]["dtype"]).name if ins and ins[0] in tensors else "?"
        counts[f"{op['op_name']} {dtype}"] += 1
    return dict(counts)


class LiteRTRunner:
    """Loads a `.tflite` once and runs it (LiteRT's CPU kernels with its default XNNPACK delegate,
    `threads` threads); inputs with more rows than the program's batch run in chunks (the last padded)."""

    runtime = "litert"

    def __init__(self, path: str | Path, threads: int = 1):
        self.interpreter = _interpreter(path, threads)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.inputs[0]["shape"][0])
        self.threads = threads
        from importlib.metadata import version

        self.version = version("ai-edge-litert")

    def _feed(self, detail: dict, x: np.ndarray) -> np.ndarray:
        if np.dtype(detail["dtype"]) == np.int8:  # quantized input: round half to even, as slimkit's quantizer
            scale, zero = detail["quantization"]
            return np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        return x.astype(np.float32)

    def _run(self, chunk: list[np.ndarray]) -> np.ndarray:
        for detail, x in zip(self.inputs, chunk):
            self.interpreter.set_tensor(detail["index"], self._feed(detail, x))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        if np.dtype(self.output["dtype"]) == np.int8:
            scale, zero = self.output["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out.copy()

    def __call__(self, *inputs) -> np.ndarray:
        from slimkit.export.runtimes import in_chunks

        return in_chunks(self._run, [np.asarray(x, dtype=np.float32) for x in inputs], self.batch)

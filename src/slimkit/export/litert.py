"""LiteRT export (`.tflite`, formerly TensorFlow Lite) and its runner.

    slimkit.export(model, "model.tflite", example_input=task.example_input(1))

Converted by `litert-torch` (no TensorFlow). Float models become float32 programs. A slimkit-quantized
model is captured with its own scales, zero points and weight codes (`export/pt2.py`, the weights in
PT2E's unfolded Q/DQ form, which the converter folds into int8 tensors) and converted in LiteRT's static
int8 mode: int8 conv / fully-connected / pooling kernels with slimkit's numbers, not a re-quantization.
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
    return path


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

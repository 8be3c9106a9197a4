"""OpenVINO export (IR: `model.xml` + `model.bin`) and its runner.

    slimkit.export(model, "model.xml", example_input=task.example_input(1))

The model goes through slimkit's ONNX export first (int8 QDQ with slimkit's own scales for quantized
models) and OpenVINO's converter reads that: QuantizeLinear/DequantizeLinear become FakeQuantize nodes,
which OpenVINO's low-precision transformations run on its u8/i8 kernels. Dynamic batch, as the ONNX file.
The runner pins fp32 inference precision (on AMX/AVX-512-BF16 CPUs OpenVINO would otherwise run float
parts in bf16). Needs the `openvino` package (in requirements.lock). OpenVINO's usage telemetry is blocked
(`block_telemetry`).
"""
from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from slimkit.errors import MissingDependencyError, ModelError, UnsupportedLayerError


def block_telemetry() -> None:
    """OpenVINO's converter (and NNCF) send usage statistics to Google Analytics from a forked process unless
    a consent file says no; slimkit never phones home: with `openvino_telemetry` unimportable they fall back
    to their built-in no-op stub. Call before importing `openvino.tools` / `nncf`."""
    import sys

    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # `import openvino_telemetry` now raises ImportError


def _openvino():
    block_telemetry()
    try:
        import openvino
    except ImportError as err:
        raise MissingDependencyError(f"OpenVINO export needs the openvino package ({err}); `make venv` installs it") from None
    return openvino


def export_openvino(model: nn.Module, path: str | Path, example_input: Any) -> Path:
    """Write `model` as OpenVINO IR at `path` (.xml, weights in the .bin beside it); returns the .xml path.
    Both files are written to temporary names and renamed (.bin first), so a reader never sees half of one."""
    from slimkit.export.base import export

    ov = _openvino()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        onnx_path = export(model, Path(tmp) / "model.onnx", example_input=example_input)
        try:
            converted = ov.convert_model(str(onnx_path))
            ov.save_model(converted, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        except Exception as err:
            raise UnsupportedLayerError(f"OpenVINO conversion of {type(model).__name__} failed: {str(err).splitlines()[0]}") from None
        os.replace(Path(tmp) / "model.bin", path.with_suffix(".bin"))
        os.replace(Path(tmp) / "model.xml", path)
    return path


def size_bytes(path: str | Path) -> int:
    """Bytes of the IR: the .xml and its .bin."""
    path = Path(path)
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size


def _compiled(path: str | Path, threads: int):
    ov = _openvino()
    try:
        return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
    except Exception as err:  # openvino raises RuntimeError subclasses of its own
        raise ModelError(f"{Path(path).name}: not a loadable OpenVINO model ({str(err).splitlines()[0]})") from None


def kernel_precisions(path: str | Path) -> dict[str, int]:
    """The compiled CPU graph's compute layers by type and runtime precision (e.g. "Convolution u8",
    "FullyConnected f32"), constants and reorders left out: which parts really run on integer kernels."""
    compiled = _compiled(path, 1)
    counts: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if kind not in ("Const", "Input", "Output", "Reorder"):
            counts[f"{kind} {precision}"] += 1
    return dict(counts)


class OpenVINORunner:
    """Compiles an IR once for the CPU (fp32 precision pinned, `threads` threads) and runs it."""

    runtime = "openvino-cpu"

    def __init__(self, path: str | Path, threads: int = 1):
        self.compiled = _compiled(path, threads)
        self.request = self.compiled.create_infer_request()
        self.threads = threads
        self._ov = _openvino()
        self.version = self._ov.__version__.split("-")[0]

    def __call__(self, *inputs) -> np.ndarray:
        # inputs shared with OpenVINO (no copy in) and the one output read off its tensor: `infer(args)` would
        # copy both ways and build a result dict, ~0.1-0.2 ms per call, a tenth of a small int8 CNN's time
        for i, x in enumerate(inputs):
            self.request.set_input_tensor(i, self._ov.Tensor(np.ascontiguousarray(x, dtype=np.float32), shared_memory=True))
        self.request.infer()
        return self.request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

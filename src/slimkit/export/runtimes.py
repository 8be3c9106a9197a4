"""The deployment runtimes in one place: which file each one runs, how to write it, run it, time it and
check it against slimkit's own model.

    name          file      writer                              runs on (here)
    ort           .onnx     `export_onnx` / int8 QDQ            ONNX Runtime CPU provider
    openvino      .xml      `export/openvino.py` (from ONNX)    OpenVINO CPU plugin (fp32 pinned)
    executorch    .pte      `export/executorch.py`              ExecuTorch + XNNPACK delegate
    litert        .tflite   `export/litert.py`                  LiteRT interpreter (XNNPACK by default)

ExecuTorch and LiteRT are phone runtimes: timed on this x86 CPU they say how the program runs here, not
on a phone (different cores, caches and XNNPACK micro-kernels); every figure records where it was taken.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slimkit.errors import ConfigError

SUFFIX = {"ort": ".onnx", "openvino": ".xml", "executorch": ".pte", "litert": ".tflite"}
MOBILE = {"executorch", "litert"}


def runtime_of(path: str | Path) -> str:
    suffix = Path(path).suffix
    for name, s in SUFFIX.items():
        if s == suffix:
            return name
    raise ConfigError(f"{Path(path).name}: no runtime runs {suffix!r} files; known: {', '.join(SUFFIX.values())}")


def in_chunks(run, inputs: list, batch: int) -> np.ndarray:
    """`run(chunk)` over the rows of `inputs` (numpy arrays) in chunks of a static-shape program's `batch`,
    the last chunk padded with copies of its first row; the outputs concatenated, padding dropped."""
    n, outs = inputs[0].shape[0], []
    for i in range(0, n, batch):
        chunk = [a[i:i + batch] for a in inputs]
        rows = chunk[0].shape[0]
        if rows < batch:
            chunk = [np.concatenate([c, np.repeat(c[:1], batch - rows, axis=0)]) for c in chunk]
        outs.append(np.asarray(run(chunk))[:rows])
    return np.concatenate(outs)


class _OrtRunner:
    runtime = "onnxruntime-cpu"

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        from slimkit.evaluate.latency import ort_session

        self.session = ort_session(path, threads)
        self.version, self.threads = ort.__version__, threads

    def __call__(self, *inputs) -> np.ndarray:
        from slimkit.evaluate.latency import ort_inputs

        return self.session.run(None, ort_inputs(self.session, inputs))[0]


def runner(path: str | Path, threads: int = 1):
    """A loaded model file ready to run numpy inputs: `runner(path)(x) -> np.ndarray`, with `.runtime`,
    `.version` and `.threads`. The runtime follows from the suffix (table above)."""
    from slimkit.errors import ArtifactError

    kind = runtime_of(path)
    if not Path(path).is_file():
        raise ArtifactError(f"model file not found: {path}")
    if kind == "ort":
        return _OrtRunner(path, threads)
    if kind == "openvino":
        from slimkit.export.openvino import OpenVINORunner

        return OpenVINORunner(path, threads)
    if kind == "executorch":
        from slimkit.export.executorch import ExecuTorchRunner

        return ExecuTorchRunner(path, threads)
    from slimkit.export.litert import LiteRTRunner

    return LiteRTRunner(path, threads)


def file_bytes(path: str | Path) -> int:
    """Bytes on disk of a deployable model (an OpenVINO IR counts its .xml and .bin)."""
    if Path(path).suffix == ".xml":
        from slimkit.export.openvino import size_bytes

        return size_bytes(path)
    return Path(path).stat().st_size


def _numpy(example: Any) -> list[np.ndarray]:
    args = example if isinstance(example, (tuple, list)) else (example,)
    return [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in args]


def workload(path: str | Path, example: Any, *, threads: int = 1):
    """A `Workload` (evaluate/latency.py) running the file at `path` on `example`, described with the
    runtime, its version, threads, batch size and, for the phone runtimes, that it was timed on this host."""
    from slimkit.core.cpu import cpu_isa
    from slimkit.evaluate.latency import Workload

    run = runner(path, threads)
    args = _numpy(example)
    info = {"runtime": run.runtime, "version": run.version, "threads": threads, "batch_size": int(args[0].shape[0])}
    if runtime_of(path) in MOBILE:
        isa = cpu_isa()
        info["note"] = f"phone runtime timed on this {isa['machine']} host ({' '.join(isa['flags'])}): not a phone latency"
    return Workload(lambda: run(*args), info)


def check_parity(model: nn.Module, path: str | Path, example: Any, threads: int = 1) -> dict[str, float]:
    """How closely the runtime's execution of `path` follows `model` in PyTorch (slimkit's simulation for a
    quantized model) on the same inputs: max/mean absolute difference, the output's std for scale, and
    top-1 agreement for classifiers."""
    args = example if isinstance(example, (tuple, list)) else (example,)
    with torch.no_grad():
        ref = model.eval()(*args).float().numpy()
    out = np.asarray(runner(path, threads)(*_numpy(example)), dtype=np.float32).reshape(ref.shape)
    diff = np.abs(out - ref)
    result = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "output_std": float(ref.std())}
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
    return result


def slow_path(path: str | Path) -> dict[str, Any]:
    """What of the program is not on the runtime's fast (delegated / integer) kernels.

    ort: node types after ONNX Runtime's fusions that are float compute ops; openvino: compute layers by
    runtime precision; executorch: XNNPACK delegate calls and the operators left on portable kernels;
    litert: operators by tensor type."""
    kind = runtime_of(path)
    if kind == "executorch":
        from slimkit.export.executorch import delegation

        return delegation(path)
    if kind == "litert":
        from slimkit.export.litert import op_counts

        return {"ops": op_counts(path)}
    if kind == "openvino":
        from slimkit.export.openvino import kernel_precisions

        return {"layers": kernel_precisions(path)}
    from slimkit.quantize.export import onnx_op_counts

    return {"ops": onnx_op_counts(path)}

"""Latency protocol: median of many timed runs after warm-up, thread count and batch recorded.

Runtimes: "torch" (PyTorch eager, inference mode) and "ort" (ONNX Runtime CPU provider, one
session per measurement, sequential execution).
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from slimkit.errors import ArtifactError


def measure_latency(fn: Callable[[], Any], *, warmup: int = 10, runs: int = 50, min_time_s: float = 0.0) -> dict:
    """Time `fn()`; returns median/p10/p90/mean in milliseconds and the number of runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= runs * 20:
            break
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[int(0.1 * (len(times) - 1))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "mean_ms": statistics.fmean(times),
        "runs": len(times),
    }


@contextmanager
def torch_threads(threads: int):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torch_latency(model: nn.Module, example: torch.Tensor | tuple, *, threads: int = 1, warmup: int = 10,
                  runs: int = 50, channels_last: bool = False) -> dict:
    """PyTorch eager latency of `model(example)` on CPU.

    channels_last: run a copy of the model and the image inputs in NHWC memory layout (PyTorch then
    uses oneDNN's blocked kernels for convolutions, often much faster for depthwise ones); the
    result records the layout.
    """
    args = example if isinstance(example, tuple) else (example,)
    model = model.eval()
    if channels_last:
        import copy

        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        args = tuple(a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args)
    with torch_threads(threads), torch.inference_mode():
        stats = measure_latency(lambda: model(*args), warmup=warmup, runs=runs)
    return {"runtime": "torch-eager", "version": torch.__version__, "threads": threads,
            "batch_size": int(args[0].shape[0]), "memory_format": "channels_last" if channels_last else "contiguous",
            **stats}


def ort_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed intra-op thread count."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file not found: {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {err}") from None


def ort_inputs(session, example) -> dict[str, np.ndarray]:
    args = example if isinstance(example, tuple) else (example,)
    names = [i.name for i in session.get_inputs()]
    return {n: (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)) for n, a in zip(names, args)}


def ort_latency(path: str | Path, example, *, threads: int = 1, warmup: int = 10, runs: int = 50) -> dict:
    """ONNX Runtime (CPU provider) latency of the model file at `path`."""
    import onnxruntime as ort

    session = ort_session(path, threads)
    feeds = ort_inputs(session, example)
    stats = measure_latency(lambda: session.run(None, feeds), warmup=warmup, runs=runs)
    batch = next(iter(feeds.values())).shape[0]
    return {"runtime": "onnxruntime-cpu", "version": ort.__version__, "threads": threads,
            "batch_size": int(batch), **stats}


def compare_latency(variants: dict[str, Callable[[], Any]], *, rounds: int = 5, min_runs: int = 3,
                    round_time_s: float = 0.05, warmup: int = 3) -> dict[str, dict]:
    """Time several variants of one workload in interleaved rounds (the protocol for comparisons).

    Each round times every variant for at least `min_runs` runs and `round_time_s` seconds, so a slow
    moment of a shared machine hits one round of every variant rather than one variant. Per variant:
    p10/p50/p90/mean over all runs (ms), the median of each round (`round_medians_ms`) and `spread`
    (p90 / p10). Compare two variants with `speedup`.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    per_round: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            got, start = [], time.perf_counter()
            while len(got) < min_runs or time.perf_counter() - start < round_time_s:
                t0 = time.perf_counter()
                fn()
                got.append((time.perf_counter() - t0) * 1e3)
            times[name] += got
            per_round[name].append(statistics.median(got))
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        p10, p90 = ts[int(0.1 * (len(ts) - 1))], ts[int(0.9 * (len(ts) - 1))]
        out[name] = {"median_ms": statistics.median(ts), "p10_ms": p10, "p90_ms": p90, "mean_ms": statistics.fmean(ts),
                     "runs": len(ts), "rounds": rounds, "round_medians_ms": per_round[name],
                     "spread": p90 / max(p10, 1e-9)}
    return out


def speedup(baseline: dict, candidate: dict) -> dict:
    """How many times faster `candidate` ran than `baseline` in the same `compare_latency` call: the median
    of the per-round ratios (robust to a slow round) with their range, and whether the rounds disagree on
    the sign of the difference (`reliable` False: call it a tie, not a speed-up or a slow-down)."""
    ratios = sorted(b / max(c, 1e-9) for b, c in zip(baseline["round_medians_ms"], candidate["round_medians_ms"]))
    faster = sum(r > 1 for r in ratios)
    return {"speedup": statistics.median(ratios), "low": ratios[0], "high": ratios[-1],
            "reliable": faster in (0, len(ratios))}

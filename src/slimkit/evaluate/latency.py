"""The latency protocol of the whole project (evaluate, stages, demo, advisor, NAS, benchmarks).

One workload (a model on a runtime, thread count, batch size) is a `Workload`: a prepared call and
what it is. Workloads are timed in interleaved rounds (`compare_latency`): each round times every
variant for a few runs, so a slow moment of a shared machine hits one round of every variant rather
than one variant. Each figure comes with its spread (p10/p50/p90 over all runs, and the median of
each round); `speedup` compares two variants of one call round by round and says when the rounds
disagree. A single workload (`measure_latency`, `torch_latency`, `ort_latency`) is timed the same
way, in rounds.

Runtimes: "torch" (PyTorch eager, inference mode) and "ort" (ONNX Runtime CPU provider, sequential
execution, fixed intra-op threads).
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from slimkit.errors import ArtifactError, ConfigError

NOISY_SPREAD = 1.5  # p90 / p10 above this: the median moves between runs more than most speed-ups we report


class Workload(NamedTuple):
    """A prepared call to time and its description (runtime, version, threads, batch size, ...)."""

    fn: Callable[[], Any]
    info: dict[str, Any]


def compare_latency(variants: dict[str, Callable[[], Any] | Workload], *, rounds: int = 5, min_runs: int = 3,
                    round_time_s: float = 0.05, warmup: int = 3, clock: Callable[[], float] = time.perf_counter
                    ) -> dict[str, dict]:
    """Time several variants of one workload in interleaved rounds (the protocol for every figure).

    Each round times every variant for at least `min_runs` runs and `round_time_s` seconds. Per variant:
    p10/p50/p90/mean over all runs (ms), the median of each round (`round_medians_ms`), `spread`
    (p90 / p10) and `noisy` (spread above NOISY_SPREAD), merged with the workload's description.
    Compare two variants with `speedup`. `clock` (seconds) is for tests. Under torchrun rank 0 times and
    every rank gets its figures: one unloaded measurement, and the same decisions on every rank.
    """
    from slimkit.core import distributed

    if rounds < 1 or min_runs < 1:
        raise ConfigError(f"latency: rounds ({rounds}) and runs per round ({min_runs}) must be >= 1")
    if distributed.world().active:
        mine = _timed(variants, rounds, min_runs, round_time_s, warmup, clock) if distributed.world().main else None
        return distributed.broadcast_object(mine)
    return _timed(variants, rounds, min_runs, round_time_s, warmup, clock)


def _timed(variants, rounds, min_runs, round_time_s, warmup, clock) -> dict[str, dict]:
    calls = {name: v if isinstance(v, Workload) else Workload(v, {}) for name, v in variants.items()}
    for w in calls.values():
        for _ in range(warmup):
            w.fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, w in calls.items():
            got, start = [], clock()
            while len(got) < min_runs or clock() - start < round_time_s:
                t0 = clock()
                w.fn()
                got.append((clock() - t0) * 1e3)
            times[name] += got
            per_round[name].append(statistics.median(got))
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        p10, p90 = ts[int(0.1 * (len(ts) - 1))], ts[int(0.9 * (len(ts) - 1))]
        spread = p90 / max(p10, 1e-9)
        out[name] = {**calls[name].info, "median_ms": statistics.median(ts), "p10_ms": p10, "p90_ms": p90,
                     "mean_ms": statistics.fmean(ts), "runs": len(ts), "rounds": rounds,
                     "round_medians_ms": per_round[name], "spread": spread, "noisy": spread > NOISY_SPREAD}
    return out


def speedup(baseline: dict, candidate: dict) -> dict:
    """How many times faster `candidate` ran than `baseline` in the same `compare_latency` call: the median
    of the per-round ratios (robust to a slow round) with their range, and whether the rounds disagree on
    the sign of the difference (`reliable` False: call it a tie, not a speed-up or a slow-down)."""
    ratios = sorted(b / max(c, 1e-9) for b, c in zip(baseline["round_medians_ms"], candidate["round_medians_ms"]))
    if not ratios:
        raise ConfigError("speedup: the two figures have no rounds in common (not from one compare_latency call)")
    faster = sum(r > 1 for r in ratios)
    return {"speedup": statistics.median(ratios), "low": ratios[0], "high": ratios[-1],
            "reliable": faster in (0, len(ratios))}


def describe_speedup(s: dict, than: str = "") -> str:
    """The words any prose uses for a `speedup` result: '2.3x faster than X (2.1-2.5x across rounds)',
    '1.4x slower ...', or 'neither clearly faster nor slower ...' when the rounds disagree."""
    lo, hi, tail = s["low"], s["high"], f" than {than}" if than else ""
    if not s["reliable"]:
        return f"neither clearly faster nor slower{tail} ({lo:.2f}-{hi:.2f}x across rounds)"
    if s["speedup"] >= 1:
        return f"{s['speedup']:.1f}x faster{tail} ({lo:.1f}-{hi:.1f}x across rounds)"
    return f"{1 / s['speedup']:.1f}x slower{tail} ({1 / hi:.1f}-{1 / lo:.1f}x across rounds)"


def _rounds_for(runs: int) -> tuple[int, int]:
    """(rounds, runs per round) for about `runs` timed runs of one workload."""
    rounds = min(5, max(1, runs))
    return rounds, max(1, math.ceil(runs / rounds))


def measure_latency(fn: Callable[[], Any] | Workload, *, warmup: int = 10, runs: int = 50) -> dict:
    """Time one workload by the protocol (about `runs` runs in up to 5 rounds): median/p10/p90/mean (ms)."""
    rounds, per_round = _rounds_for(runs)
    return compare_latency({"x": fn}, rounds=rounds, min_runs=per_round, round_time_s=0.0, warmup=warmup)["x"]


@contextmanager
def torch_threads(threads: int):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torch_call(model: nn.Module, example: torch.Tensor | tuple, *, threads: int = 1,
               channels_last: bool = False) -> Workload:
    """PyTorch eager inference of `model(example)` on CPU with `threads` threads, as a `Workload`.

    channels_last: a copy of the model and the image inputs in NHWC memory layout (PyTorch then uses
    oneDNN's blocked kernels for convolutions, often much faster for depthwise ones).
    """
    args = example if isinstance(example, tuple) else (example,)
    model = model.eval()
    if channels_last:
        import copy

        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        args = tuple(a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args)

    def run():
        with torch_threads(threads), torch.inference_mode():
            return model(*args)

    return Workload(run, {"runtime": "torch-eager", "version": torch.__version__, "threads": threads,
                          "batch_size": int(args[0].shape[0]),
                          "memory_format": "channels_last" if channels_last else "contiguous"})


def torch_latency(model: nn.Module, example: torch.Tensor | tuple, *, threads: int = 1, warmup: int = 10,
                  runs: int = 50, channels_last: bool = False) -> dict:
    """PyTorch eager latency of `model(example)` on CPU (`torch_call`, timed by `measure_latency`)."""
    return measure_latency(torch_call(model, example, threads=threads, channels_last=channels_last),
                           warmup=warmup, runs=runs)


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


def ort_call(path: str | Path, example, *, threads: int = 1) -> Workload:
    """ONNX Runtime (CPU provider) inference of the model file at `path`, as a `Workload`."""
    import onnxruntime as ort

    session = ort_session(path, threads)
    feeds = ort_inputs(session, example)
    batch = next(iter(feeds.values())).shape[0]
    return Workload(lambda: session.run(None, feeds), {"runtime": "onnxruntime-cpu", "version": ort.__version__,
                                                        "threads": threads, "batch_size": int(batch)})


def ort_latency(path: str | Path, example, *, threads: int = 1, warmup: int = 10, runs: int = 50) -> dict:
    """ONNX Runtime (CPU provider) latency of the model file at `path` (`ort_call`, `measure_latency`)."""
    return measure_latency(ort_call(path, example, threads=threads), warmup=warmup, runs=runs)

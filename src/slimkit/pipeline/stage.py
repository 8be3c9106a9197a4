"""Run one technique as a stage: apply, write its deployable artifact, evaluate, record.

Used by the demo and by recipes, so every stage is measured the same way: accuracy (and
fidelity to the reference model), params, MACs, bytes of the artifact actually written, and
latency on the runtime the artifact runs on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit.core import registry
from slimkit.core.artifact import save
from slimkit.core.config import Config
from slimkit.core.io import output_dir
from slimkit.core.task import Task
from slimkit.evaluate.metrics import Metrics, evaluate
from slimkit.report.schema import stage_entry


@dataclass
class StageOutcome:
    model: nn.Module | None
    entry: dict[str, Any]
    artifact: Path | None = None
    metrics: Metrics | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_stage(model: nn.Module, task: Task, artifact: Path | None, *, reference: nn.Module | None,
                   runtimes: tuple[str, ...] = ("torch", "ort"), threads: int = 1,
                   batch_sizes: tuple[int, ...] = (1, 64), torch_runs: bool = True, split: str = "test",
                   latency_runs: int = 30) -> Metrics:
    """Evaluate a stage's result. An .onnx artifact is timed in ONNX Runtime as written; any other
    artifact (safetensors, packed .slim) is timed in ONNX Runtime through an fp32 export of the
    model it loads into, and the metrics say so."""
    onnx_path = artifact if artifact is not None and artifact.suffix == ".onnx" else None
    rts = tuple(rt for rt in runtimes if torch_runs or rt != "torch")
    metrics = evaluate(model, task, reference=reference, artifact=artifact, runtimes=rts, onnx_path=onnx_path,
                       threads=threads, batch_sizes=batch_sizes, split=split, latency_runs=latency_runs)
    if "ort" in rts and onnx_path is None and artifact is not None:
        metrics.notes.append(f"ONNX Runtime latency: fp32 dense ONNX export of the model {artifact.suffix} loads into")
    return metrics


def run_stage(model: nn.Module, config: Config, task: Task, out_dir: Path, *, name: str | None = None,
              reference: nn.Module | None = None, runtimes: tuple[str, ...] = ("torch", "ort"),
              threads: int = 1, batch_sizes: tuple[int, ...] = (1, 64), split: str = "test",
              latency_runs: int = 30) -> StageOutcome:
    """Apply `config`'s technique to `model` and measure the result. Failures become an error entry."""
    technique = registry.for_config(config)
    name = name or technique.name
    out_dir = Path(out_dir)
    output_dir(out_dir)
    t0 = time.perf_counter()
    new = technique.apply(model, config, task=task)
    seconds = time.perf_counter() - t0
    if technique.write_artifact is not None:
        artifact = Path(technique.write_artifact(new, out_dir / name, task))
    else:
        artifact = save(new, out_dir / f"{name}.safetensors")
    notes = list(getattr(new, "slimkit_notes", []) or [])
    simulated = bool(getattr(new, "slimkit_simulated", False))
    # a model that only simulates its format in PyTorch is timed on its deployable artifact only
    metrics = evaluate_stage(new, task, artifact, reference=reference, runtimes=runtimes, threads=threads,
                             batch_sizes=batch_sizes, torch_runs=technique.runtime != "ort", split=split,
                             latency_runs=latency_runs)
    metrics.notes[:0] = notes
    entry = stage_entry(name, technique=technique.name, family=technique.family, config=config.to_dict(),
                        metrics=metrics.to_dict(), artifact=str(artifact), runtime=technique.runtime,
                        simulated=simulated, notes=metrics.notes, seconds=seconds)
    sensitivity = getattr(new, "slimkit_sensitivity", None)
    if sensitivity is not None:  # per-layer curves a technique measured (e.g. prune scope="sensitivity")
        entry["sensitivity"] = sensitivity
    blame = getattr(new, "slimkit_blame", None)
    if blame is not None:  # each quantized tensor's share of the output error (quantize blame=True)
        entry["blame"] = blame
    return StageOutcome(new, entry, artifact, metrics)

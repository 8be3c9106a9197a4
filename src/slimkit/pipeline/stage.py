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
from slimkit.core.state import report_payload
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
    registry.check_model_chain(model, technique.name)  # before any work
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
    report = report_payload(new)  # what the technique says about its result (core/state.py)
    notes = list(report.get("notes") or [])
    simulated = bool(report.get("simulated", False))
    # a model that only simulates its format in PyTorch is timed on its deployable artifact only
    metrics = evaluate_stage(new, task, artifact, reference=reference, runtimes=runtimes, threads=threads,
                             batch_sizes=batch_sizes, torch_runs=technique.runtime != "ort", split=split,
                             latency_runs=latency_runs)
    metrics.notes[:0] = notes
    entry = stage_entry(name, technique=technique.name, family=technique.family, config=config.to_dict(),
                        metrics=metrics.to_dict(), artifact=str(artifact), runtime=technique.runtime,
                        simulated=simulated, notes=metrics.notes, seconds=seconds)
    entry.update({key: value for key, value in report.items() if key not in ("notes", "simulated")})  # sections
    return StageOutcome(new, entry, artifact, metrics)


@dataclass
class Timed:
    """What a stage's latency rows were measured on: the model (PyTorch rows) and its artifact (an .onnx
    artifact is what ONNX Runtime rows time; otherwise an fp32 export of the model). The model may be None
    where only an .onnx artifact is at hand."""

    model: nn.Module | None
    artifact: Path | None = None


def time_side_by_side(entries: list[dict[str, Any]], subjects: list[Timed | None], task: Task, *, threads: int = 1,
                      rounds: int = 5, baseline: int = 0) -> None:
    """Re-time every entry's latency rows side by side, in place: for each (runtime, batch size, layout)
    the entries measured there are timed in one `compare_latency` call (interleaved rounds), so their
    ratios share the machine's moments; each row gains `vs_baseline` (`speedup` against
    `entries[baseline]`, round by round) and `side_by_side` (how many variants shared the call).
    Entries without a subject (failed stages) are left as they are; a subject without a model (an ONNX file
    another advisor worker wrote) is timed on its ONNX Runtime rows only."""
    import tempfile

    from slimkit.evaluate.latency import compare_latency, ort_call, speedup, torch_call
    from slimkit.export.onnx import export_onnx

    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for i, (entry, subject) in enumerate(zip(entries, subjects)):
        if subject is None or (subject.model is None and subject.artifact is None):
            continue
        for row in (entry.get("metrics") or {}).get("latency") or []:
            if subject.model is None and (row["runtime"].startswith("torch") or Path(subject.artifact).suffix != ".onnx"):
                continue
            key = (row["runtime"], row["batch_size"], row.get("memory_format"))
            groups.setdefault(key, []).append((i, row))
    with tempfile.TemporaryDirectory() as tmp:
        onnx: dict[int, Path] = {}

        def onnx_file(i: int) -> Path:
            subject = subjects[i]
            if subject.artifact is not None and Path(subject.artifact).suffix == ".onnx":
                return Path(subject.artifact)
            if i not in onnx:
                onnx[i] = export_onnx(subject.model, Path(tmp) / f"{i}.onnx", task.example_input(1))
            return onnx[i]

        for (runtime, batch, layout), members in groups.items():
            if len(members) < 2:
                continue
            example = task.example_input(batch)
            calls = {}
            for i, row in members:
                if runtime.startswith("torch"):
                    calls[i] = torch_call(subjects[i].model, example, threads=row.get("threads", threads),
                                          channels_last=layout == "channels_last")
                else:
                    calls[i] = ort_call(onnx_file(i), example, threads=row.get("threads", threads))
            stats = compare_latency(calls, rounds=rounds)
            for i, row in members:
                row.update(stats[i], side_by_side=len(members))
                row.pop("vs_baseline", None)
                if baseline in stats and i != baseline:
                    row["vs_baseline"] = speedup(stats[baseline], stats[i])


def retime(result: dict[str, Any], subjects: list[Timed | None], task: Task, *, threads: int = 1) -> None:
    """`time_side_by_side` over a result's stages (the first is the baseline), saying so on the console,
    with a warning line when the figures are noisy (`report.html.noise_reasons`)."""
    from slimkit.core.progress import console
    from slimkit.report.html import noise_reasons
    from slimkit.report.schema import environment

    t0 = time.perf_counter()
    time_side_by_side(result["stages"], subjects, task, threads=threads)
    result.setdefault("environment", {}).update(load_average_1m=environment().get("load_average_1m"))
    console.print(f"latency: every stage timed side by side with the baseline, interleaved rounds "
                  f"({time.perf_counter() - t0:.0f}s)", markup=False, highlight=False)
    for why in noise_reasons(result["stages"], result["environment"]):
        console.print(f"  warning: noisy timing: {why}", markup=False, highlight=False)

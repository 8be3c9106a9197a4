"""The advisor: "which technique should I use?" answered by measurement.

    result = slimkit.pipeline.advisor.advise(model, task, AutoConfig(max_accuracy_drop=0.5), out="auto-out")

1. Search (`advisor_search`; Optuna, NSGA-II, three objectives: validation accuracy, bytes of the
   deployable file, latency on the target runtime; alone or shared by workers on an Optuna storage) over recipes built from the registered techniques:
   distillation into a cheaper zoo student (the advisor's own dimension), then each technique's
   `Technique.candidates` (today structured pruning to a MACs target) and a deployable format from
   the final techniques' candidates — fp32 ONNX, int8 QDQ ONNX, or a packed `.slim` file (unstructured
   sparsity + k-means weight sharing + zstd) that loads into a dense model (`advisor_space`). Expensive prefixes (a trained student,
   a pruned network) are computed once and shared by the trials that start with them.
2. Sensitivity: every layer's accuracy under sparsity, truncated rank and low-bit weights
   (`sensitivity.analyse`), on the validation split (for the report's explanation).
3. The Pareto front, and one recommendation: among the candidates that meet every constraint on
   validation data, the one with the smallest product of size and latency relative to the original.
   It is re-run from scratch as a recipe through `compress` (test-split metrics, checkpoints,
   report), and explained in words from the measurements.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit.core.io import output_dir, write_text
from slimkit.core.layers import pareto_front as front_of
from slimkit.core.progress import console
from slimkit.core.trials import worker_id
from slimkit.core.task import Task
from slimkit.errors import InfeasibleError
from slimkit.pipeline.advisor_report import search_sections, describe, explain
from slimkit.pipeline.advisor_search import Clock, search, seed_points
from slimkit.pipeline.advisor_space import (AutoConfig, build_stages, describe_student, parse_student,
                                            scaled_epochs, student_candidates, student_key, technique_space)
from slimkit.pipeline.recipe import Constraints, Evaluation, Recipe, Stage
from slimkit.pipeline.sensitivity import analyse
from slimkit.report import write_html, write_json

__all__ = ["AutoConfig", "advise", "search", "feasible", "score", "pareto_front", "explain", "describe",
           "describe_student", "parse_student", "student_key", "student_candidates", "build_stages", "technique_space",
           "Clock", "screening_task", "scaled_epochs", "budget_notes", "seed_points"]


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated in (accuracy up, size down, latency down)."""
    return front_of(points, maximize=("accuracy",), minimize=("size_bytes", "latency_ms"))


def feasible(point: dict, base: dict, config: AutoConfig) -> bool:
    """Within the user's limits, and neither larger nor slower than the original: a "compressed"
    model that runs slower is not a recommendation, whatever its size."""
    if point["size_bytes"] >= base["size_bytes"] or point["latency_ms"] >= base["latency_ms"]:
        return False
    if 100 * (base["accuracy"] - point["accuracy"]) > config.max_accuracy_drop + 1e-9:
        return False
    if config.max_size_kb is not None and point["size_bytes"] / 1024 > config.max_size_kb:
        return False
    if config.max_latency_ms is not None and point["latency_ms"] > config.max_latency_ms:
        return False
    return True


def score(point: dict, base: dict) -> float:
    """Lower is better: log size ratio + log latency ratio (each halving counts the same)."""
    return math.log(point["size_bytes"] / base["size_bytes"]) + math.log(point["latency_ms"] / base["latency_ms"])


def screening_task(task: Task, config: AutoConfig) -> tuple[Task, float]:
    """The task the search trains on: at most `screen_images` training images (a fixed random subset),
    validation and test whole. Returns (task, subset / full size)."""
    import dataclasses

    import torch
    from torch.utils.data import Subset

    n = len(task.train)  # type: ignore[arg-type]
    if config.screen_images is None or n <= config.screen_images:
        return task, 1.0
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))[: config.screen_images]
    subset = dataclasses.replace(task, train=Subset(task.train, sorted(keep.tolist())), calibration=task.calibration)
    subset.info = {**task.info, "screening_subset": [config.screen_images, n]}
    return subset, config.screen_images / n


# -- entry point --------------------------------------------------------------------------------
def advise(model: nn.Module, task: Task, config: AutoConfig | None = None, out: str | Path = "slimkit-auto", *,
           model_name: str | None = None, storage: str | None = None, study: str = "auto",
           worker: bool = False) -> dict[str, Any]:
    """Analyse, search, recommend, and build the recommended model with its recipe and report.

    storage / study: share the search's trials with every worker on that Optuna study (`search`). A
    `worker` only runs trials until the study has its `trials` and returns {"worker": ..., "trials": N run
    here}; the run without `worker=True` waits for them, then recommends and reports."""
    import html

    from slimkit.pipeline.runner import compress

    config = config or AutoConfig()
    out = Path(out)
    work = out / "search"
    output_dir(work)
    t0 = time.perf_counter()
    clock = Clock(config.time_budget_s, t0)
    screen, scale = screening_task(task, config)
    if worker:
        if storage is None:
            from slimkit.errors import ConfigError

            raise ConfigError("an advisor worker needs a storage (--storage) shared with the run that reports")
        _, points, _ = search(model, screen, config, work, clock, storage=storage, study_name=study, report=False)
        ran = sum(p.get("worker") == worker_id() for p in points)
        console.print(f"[bold]advisor worker[/bold]: the study {study!r} has {len(points)} measured points, "
                      f"{ran} of them from this worker")
        return {"worker": worker_id(), "trials": ran, "points": len(points)}
    n_full = len(task.train)  # type: ignore[arg-type]
    console.print(f"[bold]advisor[/bold]: searching {config.trials} recipes"
                  + (f" on {len(screen.train):,} of {n_full:,} training images" if scale < 1 else ""))
    base, points, screening = search(model, screen, config, work, clock, storage=storage, study_name=study,
                                     full=(task, scale) if scale < 1 else None)
    console.print("[bold]advisor[/bold]: per-layer sensitivity (sparsity, rank, bit width)")
    sens = analyse(model, task)  # after the search: a shared search's workers all start trials at once
    budget = {"screen_images": len(screen.train), "train_images": n_full, "epoch_scale": scale,
              "time_budget_s": config.time_budget_s, "trials_run": len(points), "stopped": clock.stopped,
              "screening_stopped": clock.screening,
              "finalists": [{"trial": p["trial"], "recipe": describe(p["params"]),
                             "subset_drop_points": 100 * (base["accuracy"] - p["subset"]["accuracy"]),
                             "drop_points": 100 * (base["accuracy"] - p["accuracy"])} for p in points if p.get("finalist")],
              "search_seconds": time.perf_counter() - t0, "rebuild_estimate_s": clock.reserve}
    front = pareto_front(points + [base])
    candidates = sorted((p for p in points if feasible(p, base, config)), key=lambda p: score(p, base))
    chosen = candidates[0] if candidates else None
    sections = search_sections(base, points, front, chosen, screening, sens, config)
    if chosen is None:  # still show what was measured, then say why nothing qualified
        from slimkit.report import new_result

        result = new_result({"name": model_name or type(model).__name__, "source": model_name},
                            {"name": task.name, "splits": task.info.get("splits"), "input_shape": list(task.input_shape)})
        result["sections"].update(sections)
        result["sections"]["advisor"] = {"config": config.to_dict(), "seconds": time.perf_counter() - t0,
                                         "recommendation": None, "budget": budget}
        write_json(result, out / "result.json")
        write_html(result, out / "report.html")
        closest = min(points, key=lambda p: base["accuracy"] - p["accuracy"])
        raise InfeasibleError(
            f"no recipe met the constraints (max accuracy drop {config.max_accuracy_drop} points"
            + (f", max size {config.max_size_kb} KiB" if config.max_size_kb else "")
            + (f", max latency {config.max_latency_ms} ms" if config.max_latency_ms else "")
            + ", smaller and faster than the original"
            + f"); the most accurate candidate ({describe(closest['params'])}) loses "
            f"{100 * (base['accuracy'] - closest['accuracy']):.2f} points at {closest['size_bytes'] / 1024:.1f} KiB, "
            f"{closest['latency_ms']:.3f} ms (original: {base['size_bytes'] / 1024:.1f} KiB, {base['latency_ms']:.3f} ms); "
            f"every trial is in {out / 'report.html'}")
    reasons = explain(sens, base, chosen, points, config, screening) + budget_notes(budget)
    stages = build_stages(chosen["params"], config, scale) if scale < 1 else [Stage.from_dict(s) for s in chosen["stages"]]
    recipe = Recipe(name="auto", seed=config.seed, stages=stages,
                    evaluation=Evaluation(runtimes=["torch", "ort"], threads=config.threads, batch_sizes=[1, 64]),
                    constraints=Constraints(max_accuracy_drop=config.max_accuracy_drop, max_size_kb=config.max_size_kb,
                                            max_latency_ms=config.max_latency_ms, latency_runtime=config.runtime,
                                            latency_batch_size=config.latency_batch_size))
    write_text(out / "recipe.yaml", recipe.to_yaml())
    console.print(f"[bold]advisor[/bold]: recommended {describe(chosen['params'])}; building it from the recipe")
    result = compress(model, recipe, task, out / "recommended", resume=False, model_name=model_name)
    final = result["stages"][-1]
    save_path = out / "recommended" / "checkpoints" / f"stage-{len(recipe.stages):02d}.safetensors"

    result["sections"]["recommendation"] = {"html": (
        f"<div class=card><p><b>{html.escape(describe(chosen['params']))}</b></p><ul>"
        + "".join(f"<li>{html.escape(r)}</li>" for r in reasons)
        + f"</ul><p>Recipe: <code>recipe.yaml</code>; deployable file: <code>{html.escape(str(final['artifact']))}</code>; "
        f"reloadable model: <code>{html.escape(str(save_path))}</code>.</p></div>"), "reasons": reasons,
        "params": chosen["params"]}
    result["sections"].update(sections)
    seconds = time.perf_counter() - t0
    if config.time_budget_s is not None and seconds > config.time_budget_s:
        reasons.append(f"the run took {seconds:.0f} s, over the {config.time_budget_s:.0f} s time budget: rebuilding "
                       f"the recommendation on the full data took longer than the {clock.reserve:.0f} s estimated")
    result["sections"]["advisor"] = {"config": config.to_dict(), "seconds": seconds,
                                     "budget": {**budget, "rebuild_seconds": seconds - budget["search_seconds"]}}
    write_json(result, out / "result.json")
    write_html(result, out / "report.html")
    return result


def budget_notes(budget: dict) -> list[str]:
    """What the search ran on and when it stopped, in words (report and CLI)."""
    notes = []
    if budget["epoch_scale"] < 1:
        notes.append(f"searched on {budget['screen_images']:,} of the {budget['train_images']:,} training images "
                     f"(validation whole); the recommendation was rebuilt on all of them with its epochs scaled by "
                     f"{budget['epoch_scale']:.3f}, so it saw as many examples as in the search")
    if budget.get("finalists"):
        notes.append(f"{len(budget['finalists'])} finalists rebuilt on all {budget['train_images']:,} training images and "
                     "judged by those figures (validation drop on the subset -> on all): "
                     + "; ".join(f"trial {f['trial']} ({f['recipe']}) {f['subset_drop_points']:.2f} -> "
                                 f"{f['drop_points']:.2f} points" for f in budget["finalists"]))
    if budget.get("screening_stopped"):
        notes.append(f"time budget {budget['time_budget_s']:.0f} s: {budget['screening_stopped']}")
    if budget["stopped"]:
        notes.append(f"time budget {budget['time_budget_s']:.0f} s: the search stopped {budget['stopped']}, keeping "
                     f"{budget['rebuild_estimate_s']:.0f} s (x1.5) for the rebuild")
    return notes



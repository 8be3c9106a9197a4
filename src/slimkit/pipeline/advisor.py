"""The advisor: "which technique should I use?" answered by measurement.

    result = slimkit.pipeline.advisor.advise(model, task, AutoConfig(max_accuracy_drop=0.5), out="auto-out")

1. Sensitivity: every layer's accuracy under sparsity, truncated rank and low-bit weights
   (`sensitivity.analyse`), on the validation split.
2. Search (Optuna, NSGA-II, three objectives: validation accuracy, bytes of the deployable file,
   latency on the target runtime) over recipes built from the registered techniques:
   distillation into a cheaper zoo student (the advisor's own dimension), then each technique's
   `Technique.candidates` (today structured pruning to a MACs target) and a deployable format from
   the final techniques' candidates — fp32 ONNX, int8 QDQ ONNX, or a packed `.slim` file (unstructured
   sparsity + k-means weight sharing + zstd) that loads into a dense model (`advisor_space`). Expensive prefixes (a trained student,
   a pruned network) are computed once and shared by the trials that start with them.
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

from slimkit.core import registry
from slimkit.core.io import output_dir, write_text
from slimkit.core.layers import pareto_front as front_of
from slimkit.core.progress import console
from slimkit.core.task import Task
from slimkit.errors import InfeasibleError
from slimkit.pipeline.advisor_report import search_sections, describe, explain
from slimkit.pipeline.advisor_space import (FP32, AutoConfig, base_params, build_stages, describe_student,
                                            parse_student, scaled_epochs, student_candidates, student_key,
                                            technique_space)
from slimkit.pipeline.recipe import Constraints, Evaluation, Recipe, Stage
from slimkit.pipeline.sensitivity import analyse
from slimkit.pipeline.stage import Timed, evaluate_stage, run_stage, time_side_by_side
from slimkit.report import write_html, write_json

__all__ = ["AutoConfig", "advise", "search", "feasible", "score", "pareto_front", "explain", "describe",
           "describe_student", "parse_student", "student_key", "student_candidates", "build_stages", "technique_space",
           "Clock", "screening_task", "scaled_epochs", "budget_notes"]


class _Runner:
    """Evaluates search points, sharing models of common stage prefixes between trials."""

    def __init__(self, model: nn.Module, task: Task, config: AutoConfig, work: Path):
        self.model, self.task, self.config, self.work = model, task, config, work
        self.cache: dict[str, nn.Module] = {}
        self.seconds: dict[str, float] = {}  # prefix key -> seconds it took to compute
        self.timed: dict[int, Timed] = {}  # trial number -> what its latency was measured on
        self.eval_kw = dict(runtimes=(config.runtime,), threads=config.threads,
                            batch_sizes=(config.latency_batch_size,), split="val", latency_runs=20)

    def _prefix_model(self, stages: list[Stage]) -> nn.Module:
        if not stages:
            return self.model
        key = repr([s.to_dict() for s in stages])
        if key not in self.cache:
            parent = self._prefix_model(stages[:-1])
            stage = stages[-1]
            t0 = time.perf_counter()
            self.cache[key] = registry.get(stage.technique).apply(parent, stage.technique_config(), task=self.task)
            self.seconds[key] = time.perf_counter() - t0
        return self.cache[key]

    def recipe_seconds(self, stages: list[Stage], own: float) -> float:
        """What building `stages` from scratch costs: its shared prefixes (however they were cached) plus
        `own`, the seconds of the trial's own evaluation."""
        return own + sum(self.seconds.get(repr([s.to_dict() for s in stages[:i]]), 0.0)
                         for i in range(1, len(stages) + 1))

    def evaluate(self, number: int, stages: list[Stage]):
        name = f"trial-{number:02d}"
        last = stages[-1] if stages else None
        if last is not None and last.technique in ("quantize", "pack"):
            parent = self._prefix_model(stages[:-1])
            outcome = run_stage(parent, last.technique_config(), self.task, self.work, name=name,
                                reference=self.model, **self.eval_kw)
            self.timed[number] = Timed(outcome.model, outcome.artifact)
            return outcome.metrics
        model = self._prefix_model(stages)
        from slimkit.export import export_onnx

        artifact = export_onnx(model, self.work / f"{name}.onnx", self.task.example_input(1))
        self.timed[number] = Timed(model, artifact)
        return evaluate_stage(model, self.task, artifact, reference=self.model, **self.eval_kw)


def _objectives(metrics, config: AutoConfig) -> tuple[float, float, float]:
    latency = metrics.latency_ms(None, config.latency_batch_size)
    return metrics.accuracy, float(metrics.size_bytes), float(latency)


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


class Clock:
    """The run's time budget: `left()` seconds (inf without a budget) and the largest recipe cost seen,
    which is what the rebuild of the recommendation is expected to need."""

    def __init__(self, budget_s: float | None, start: float | None = None):
        self.budget_s, self.start = budget_s, time.perf_counter() if start is None else start
        self.reserve = 0.0
        self.stopped: str | None = None

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (time.perf_counter() - self.start)

    def allows(self, what: str) -> bool:
        """False (and remembered) once the time left no longer covers the rebuild reserve."""
        if self.stopped is None and self.left() < 1.5 * self.reserve:
            self.stopped = what
        return self.stopped is None


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


def search(model: nn.Module, task: Task, config: AutoConfig, work: Path,
           clock: Clock | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Screen students, then run the multi-objective search; returns (baseline point, trial points,
    student screening rows). With a `clock`, stops starting work when the time left would not cover
    rebuilding the most expensive recipe measured."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    clock = clock or Clock(None)
    runner = _Runner(model, task, config, work)
    base_metrics = runner.evaluate(0, [])
    acc, size, lat = _objectives(base_metrics, config)
    base = {"trial": 0, "params": base_params(config), "accuracy": acc,
            "size_bytes": size, "latency_ms": lat, "stages": [], "metrics": base_metrics.to_dict()}

    kept, screening = screen_students(runner, base, config, clock)
    students = ["none"] + kept
    dims, formats = technique_space(config)
    choices = {name: ["none"] + list(offered) for name, offered in dims.items()}
    sampler = optuna.samplers.NSGAIISampler(seed=config.seed, population_size=max(4, config.trials // 3))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    for params in seed_points(kept, choices, list(formats))[: config.trials]:
        study.enqueue_trial(params)
    points: list[dict] = []
    seen: dict[str, dict] = {}
    from slimkit.core.progress import progress_bar

    with progress_bar("advisor search", config.trials) as advance:
        for _ in range(config.trials):
            if points and not clock.allows(f"after {len(points)} of {config.trials} trials"):
                break
            trial = study.ask()
            params = {"student": trial.suggest_categorical("student", students),
                      **{name: trial.suggest_categorical(name, c) for name, c in choices.items()},
                      "format": trial.suggest_categorical("format", [FP32] + list(formats))}
            key = repr(sorted(params.items()))
            if key in seen:  # the sampler proposed a point already measured: reuse it
                point = seen[key]
            else:
                stages = build_stages(params, config)
                t0 = time.perf_counter()
                metrics = runner.evaluate(trial.number + 1, stages)
                a, s, latency = _objectives(metrics, config)
                seconds = time.perf_counter() - t0
                point = {"trial": trial.number + 1, "params": params, "accuracy": a, "size_bytes": s,
                         "latency_ms": latency, "stages": [st.to_dict() for st in stages],
                         "metrics": metrics.to_dict(), "seconds": seconds,
                         "recipe_seconds": runner.recipe_seconds(stages, seconds)}
                clock.reserve = max(clock.reserve, point["recipe_seconds"])
                seen[key] = point
                points.append(point)
            study.tell(trial, [point["accuracy"], point["size_bytes"], point["latency_ms"]])
            advance(1, acc=point["accuracy"], kb=point["size_bytes"] / 1024)
    side_by_side(runner, base, points)
    return base, points, screening


def seed_points(students: list[str], choices: dict[str, list[str]], formats: list[str]) -> list[dict]:
    """The first points tried, those most likely to be on the front: each kept student in a light candidate
    of each format (its second, where it offers several: candidates come mildest first and the first is
    often "nothing more", e.g. packing unpruned); the original in each format's most aggressive one, alone
    and after every other technique's most aggressive candidate."""
    plain = {name: "none" for name in choices}
    by_technique: dict[str, list[str]] = {}
    for fmt in formats:
        by_technique.setdefault(fmt.split(":", 1)[0], []).append(fmt)
    light = [f[1] if len(f) > 1 else f[0] for f in by_technique.values()]
    heavy = [f[-1] for f in by_technique.values()]
    seeds = [{"student": s, **plain, "format": f} for s in students for f in light]
    seeds += [{"student": "none", **plain, "format": f} for f in heavy]
    if choices:
        seeds += [{"student": "none", **{n: c[-1] for n, c in choices.items()}, "format": f} for f in heavy]
    return seeds


def side_by_side(runner: _Runner, base: dict, points: list[dict]) -> None:
    """Time the original and every trial again in one interleaved comparison (`time_side_by_side`): the
    search steered by each trial's own measurement; the choice, the table and every ratio in the prose come
    from these figures, so they share the machine's moments. Sets each point's `latency_ms` and `timing`
    (the row: median, p10/p90, round medians, `vs_baseline`)."""
    entries = [base] + points
    time_side_by_side(entries, [runner.timed.get(p["trial"]) for p in entries], runner.task,
                      threads=runner.config.threads)
    for p in entries:
        row = next((r for r in p["metrics"]["latency"] if r["batch_size"] == runner.config.latency_batch_size), None)
        if row is not None:
            p["latency_ms"], p["timing"] = row["median_ms"], row


def screen_students(runner: _Runner, base: dict, config: AutoConfig,
                    clock: Clock | None = None) -> tuple[list[str], list[dict]]:
    """Train every candidate student twice, distilled from the model (soft targets) and on the hard
    labels alone, both on shifted images, and keep the better of the two (the trained students are
    shared with the trials). Keep up to `max_students`: the cheapest within the accuracy budget on
    validation data, topped up with the most accurate of the others. Returns (kept keys, one row per
    candidate)."""
    from slimkit.core.progress import progress_bar
    from slimkit.core.trainer import accuracy

    clock = clock or Clock(None)
    candidates = student_candidates(runner.model, runner.task) if config.max_students else []
    rows = []
    with progress_bar("advisor: screening students", 2 * len(candidates)) as advance:
        for key, macs in candidates:
            # a student costs about what the cheapest one did (they are screened cheapest first)
            if rows and not clock.allows(f"after screening {len(rows)} of {len(candidates)} students"):
                break
            acc = {}
            for signal, k in (("kd", key), ("labels", key + "@labels")):
                stages = build_stages({"student": k}, config)
                student = runner._prefix_model(stages)
                acc[signal] = accuracy(student, runner.task, "val")
                clock.reserve = max(clock.reserve, runner.recipe_seconds(stages, 0.0))
                advance(1, acc=acc[signal])
            labels = acc["labels"] > acc["kd"]  # a tie goes to distillation
            rows.append({"student": key + "@labels" if labels else key, "macs": macs,
                         "params": sum(p.numel() for p in student.parameters()), "accuracy": max(acc.values()),
                         "kd_accuracy": acc["kd"], "labels_accuracy": acc["labels"]})
    within = [r for r in rows if 100 * (base["accuracy"] - r["accuracy"]) <= config.max_accuracy_drop + 1e-9]
    others = sorted((r for r in rows if r not in within), key=lambda r: -r["accuracy"])
    kept = (within + others)[: config.max_students]
    for r in rows:
        r["kept"] = r in kept
    return [r["student"] for r in kept], rows


# -- entry point --------------------------------------------------------------------------------
def advise(model: nn.Module, task: Task, config: AutoConfig | None = None, out: str | Path = "slimkit-auto", *,
           model_name: str | None = None) -> dict[str, Any]:
    """Analyse, search, recommend, and build the recommended model with its recipe and report."""
    import html

    from slimkit.pipeline.runner import compress

    config = config or AutoConfig()
    out = Path(out)
    work = out / "search"
    output_dir(work)
    t0 = time.perf_counter()
    clock = Clock(config.time_budget_s, t0)
    console.print("[bold]advisor[/bold]: per-layer sensitivity (sparsity, rank, bit width)")
    sens = analyse(model, task)
    screen, scale = screening_task(task, config)
    n_full = len(task.train)  # type: ignore[arg-type]
    console.print(f"[bold]advisor[/bold]: searching {config.trials} recipes"
                  + (f" on {len(screen.train):,} of {n_full:,} training images" if scale < 1 else ""))
    base, points, screening = search(model, screen, config, work, clock)
    budget = {"screen_images": len(screen.train), "train_images": n_full, "epoch_scale": scale,
              "time_budget_s": config.time_budget_s, "trials_run": len(points), "stopped": clock.stopped,
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
    if budget["stopped"]:
        notes.append(f"time budget {budget['time_budget_s']:.0f} s: the search stopped {budget['stopped']}, keeping "
                     f"{budget['rebuild_estimate_s']:.0f} s (x1.5) for the rebuild")
    return notes



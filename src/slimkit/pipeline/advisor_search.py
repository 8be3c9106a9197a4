"""The advisor's search: screening students, then the multi-objective trials (Optuna NSGA-II over accuracy,
bytes and latency), alone or shared with other workers on an Optuna storage (`slimkit auto --storage`),
and the final side-by-side timing of every point. `advisor.advise` turns the result into a recommendation.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch.nn as nn

from slimkit.core import registry
from slimkit.core.task import Task
from slimkit.pipeline.advisor_space import (FP32, AutoConfig, base_params, build_stages, student_candidates,
                                            technique_space)
from slimkit.pipeline.recipe import Stage
from slimkit.pipeline.stage import Timed, evaluate_stage, run_stage, time_side_by_side

# Under a time budget, student screening may use at most this share of the time left when it starts: the
# rest is for the trials (which reuse the trained students), the sensitivity scan and the rebuild.
SCREEN_SHARE = 0.4


class Clock:
    """The run's time budget: `left()` seconds (inf without a budget) and the largest recipe cost seen,
    which is what the rebuild of the recommendation is expected to need."""

    def __init__(self, budget_s: float | None, start: float | None = None):
        self.budget_s, self.start = budget_s, time.perf_counter() if start is None else start
        self.reserve = 0.0
        self.stopped: str | None = None
        self.screening: str | None = None  # why student screening stopped early, if it did

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (time.perf_counter() - self.start)

    def allows(self, what: str) -> bool:
        """False (and remembered) once the time left no longer covers the rebuild reserve."""
        if self.stopped is None and self.left() < 1.5 * self.reserve:
            self.stopped = what
        return self.stopped is None


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


def search(model: nn.Module, task: Task, config: AutoConfig, work: Path, clock: Clock | None = None, *,
           storage: str | None = None, study_name: str = "auto", report: bool = True,
           full: tuple[Task, float] | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Screen students, then run the multi-objective search; returns (baseline point, trial points,
    student screening rows). With a `clock`, stops starting work when the time left would not cover
    rebuilding the most expensive recipe measured. `full` = (the whole task, subset / full size) when
    `task` is a training subset: the `config.finalists` best points are then rebuilt on the whole
    task (`rebuild_finalists`) before the final timing. With `storage` (an Optuna storage URL, as for
    `slimkit search`), the trials are shared with every worker on the same study: each worker screens the
    students itself (the same, deterministic result), trials are taken one at a time and run once, and
    the points are those of every worker. `report=False` (a helper worker) skips the final side-by-side
    timing."""
    import optuna

    from slimkit.core.progress import progress_bar
    from slimkit.core.trials import run_shared, worker_id

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
    space = {"students": students, "choices": choices, "formats": list(formats)}
    study, created = _open_study(config, storage, study_name, base, space)
    if created:
        for params in seed_points(kept, choices, list(formats))[: config.trials]:
            study.enqueue_trial(params)
    mine: list[dict] = []

    def run_trial(trial) -> list[float]:
        params = {"student": trial.suggest_categorical("student", students),
                  **{name: trial.suggest_categorical(name, c) for name, c in choices.items()},
                  "format": trial.suggest_categorical("format", [FP32] + list(formats))}
        twin = _measured(study, params)
        if twin is not None:  # the sampler proposed a point already measured: reuse it
            trial.set_user_attr("point", {**twin, "reused": True})
            return [twin["accuracy"], twin["size_bytes"], twin["latency_ms"]]
        stages = build_stages(params, config)
        t0 = time.perf_counter()
        metrics = runner.evaluate(trial.number + 1, stages)
        a, s, latency = _objectives(metrics, config)
        seconds = time.perf_counter() - t0
        artifact = runner.timed[trial.number + 1].artifact
        point = {"trial": trial.number + 1, "params": params, "accuracy": a, "size_bytes": s,
                 "latency_ms": latency, "stages": [st.to_dict() for st in stages],
                 "metrics": metrics.to_dict(), "seconds": seconds,
                 "recipe_seconds": runner.recipe_seconds(stages, seconds),
                 "artifact": str(Path(artifact).resolve()) if artifact else None, "worker": worker_id()}
        clock.reserve = max(clock.reserve, point["recipe_seconds"])
        trial.set_user_attr("point", point)
        mine.append(point)
        return [a, s, latency]

    with progress_bar("advisor search", config.trials) as advance:
        shown = [0]

        def on_progress(done: int) -> None:
            advance(done - shown[0])
            shown[0] = done

        run_shared(study, config.trials, run_trial, stale_after_s=60.0, log_dir=work if storage else None,
                   on_progress=on_progress, retry_reaped=True,
                   allows=lambda: not mine or clock.allows(f"after {shown[0]} of {config.trials} trials"))
    points = _points(study)
    if report:
        if full is not None:
            rebuild_finalists(model, full, base, points, config, work, runner, clock)
        for p in points:
            if p["trial"] not in runner.timed:  # measured by another worker
                runner.timed[p["trial"]] = _subject(runner, p)
        side_by_side(runner, base, points)
    return base, points, screening


def _open_study(config: AutoConfig, storage: str | None, study_name: str, base: dict, space: dict):
    """(study, whether this call created it). A study on a storage remembers the settings, the original's
    validation accuracy and size and the search space: a worker that differs in any is refused."""
    import os

    import optuna

    from slimkit.core.trials import open_storage
    from slimkit.errors import ConfigError

    directions = ["maximize", "minimize", "minimize"]
    population = max(4, config.trials // 3)
    if storage is None:
        sampler = optuna.samplers.NSGAIISampler(seed=config.seed, population_size=population)
        return optuna.create_study(directions=directions, sampler=sampler), True
    bound = {"config": {k: v for k, v in config.to_dict().items() if k != "time_budget_s"},
             "original": [base["accuracy"], base["size_bytes"]], "space": space}
    opened = open_storage(storage)
    try:
        sampler = optuna.samplers.NSGAIISampler(seed=config.seed, population_size=population)
        study = optuna.create_study(storage=opened, study_name=study_name, directions=directions, sampler=sampler)
        study.set_user_attr("slimkit_auto", bound)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    # a second sampler seed: workers with one seed would propose the same points
    sampler = optuna.samplers.NSGAIISampler(seed=config.seed + os.getpid(), population_size=population)
    study = optuna.load_study(study_name=study_name, storage=opened, sampler=sampler)
    theirs = study.user_attrs.get("slimkit_auto")
    if theirs is not None and theirs != bound:
        what = [k for k in bound if bound[k] != theirs.get(k)]
        raise ConfigError(f"study {study_name!r} in {storage} was started with another {' and '.join(what)} "
                          "(settings, original model/data or search space); use another --study, or the same "
                          "model, data and options to join it")
    return study, False


def _measured(study, params: dict) -> dict | None:
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        point = t.user_attrs.get("point")
        if point is not None and not point.get("reused") and point["params"] == params:
            return point
    return None


def _points(study) -> list[dict]:
    """Every measured point of the study (each once), in trial order."""
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return [t.user_attrs["point"] for t in trials if "point" in t.user_attrs and not t.user_attrs["point"].get("reused")]


def _subject(runner: _Runner, point: dict) -> Timed:
    """What to time for a point another worker measured: its file where this machine can read it (an ONNX
    file for ONNX Runtime rows, a saved model to load), else the recipe rebuilt here."""
    from slimkit.core.artifact import load

    path = Path(point["artifact"]) if point.get("artifact") else None
    if path is not None and path.is_file():
        if path.suffix == ".onnx" and runner.config.runtime == "ort":
            return Timed(None, path)
        if path.suffix in (".slim", ".safetensors"):
            return Timed(load(path), path)
    runner.evaluate(point["trial"], [Stage.from_dict(s) for s in point["stages"]])
    return runner.timed[point["trial"]]


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


def rebuild_finalists(model: nn.Module, full: tuple[Task, float], base: dict, points: list[dict], config: AutoConfig,
                      work: Path, runner: _Runner, clock: Clock) -> list[dict]:
    """Rebuild the `config.finalists` most accurate points that are smaller and faster than the original
    (and within the size/latency limits) on the whole task, training budgets scaled by subset / full size
    (the same examples seen), and replace their figures by the rebuilt ones (the subset's are kept as
    `subset`). Stops when the clock no longer covers the recommendation's rebuild. Returns the finalists."""
    from slimkit.core.progress import progress_bar

    task, scale = full

    def eligible(p: dict) -> bool:
        return (p["size_bytes"] < base["size_bytes"] and p["latency_ms"] < base["latency_ms"]
                and (config.max_size_kb is None or p["size_bytes"] / 1024 <= config.max_size_kb)
                and (config.max_latency_ms is None or p["latency_ms"] <= config.max_latency_ms))

    chosen = sorted(filter(eligible, points), key=lambda p: -p["accuracy"])[: config.finalists]
    whole = _Runner(model, task, config, work / "finalists")
    done = []
    with progress_bar("advisor: finalists on all training images", len(chosen)) as advance:
        for p in chosen:
            if not clock.allows(f"after rebuilding {len(done)} of {len(chosen)} finalists on all training images"):
                break
            stages = build_stages(p["params"], config, scale)
            t0 = time.perf_counter()
            metrics = whole.evaluate(p["trial"], stages)
            clock.reserve = max(clock.reserve, whole.recipe_seconds(stages, time.perf_counter() - t0))
            a, s, latency = _objectives(metrics, config)
            p["subset"] = {k: p[k] for k in ("accuracy", "size_bytes", "latency_ms")}
            p.update({"accuracy": a, "size_bytes": s, "latency_ms": latency, "metrics": metrics.to_dict(),
                      "stages": [st.to_dict() for st in stages], "finalist": True})
            artifact = whole.timed[p["trial"]].artifact
            p["artifact"] = str(Path(artifact).resolve()) if artifact else None
            runner.timed[p["trial"]] = whole.timed[p["trial"]]
            done.append(p)
            advance(1, acc=a)
    return done


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
    validation data, topped up with the most accurate of the others. Under a time budget, screening stops
    (cheapest students first, so the most likely to fit are in) before the next student would take it past
    `SCREEN_SHARE` of the time left, and says so in `clock.screening`. Returns (kept keys, one row per
    candidate)."""
    from slimkit.core.progress import progress_bar
    from slimkit.core.trainer import accuracy

    clock = clock or Clock(None)
    candidates = student_candidates(runner.model, runner.task) if config.max_students else []
    rows = []
    limit, start, last = SCREEN_SHARE * clock.left(), time.perf_counter(), 0.0
    with progress_bar("advisor: screening students", 2 * len(candidates)) as advance:
        for key, macs in candidates:
            # the next student costs at least what the last one did (they are screened cheapest first)
            if rows and time.perf_counter() - start + last > limit:
                clock.screening = (f"screened {len(rows)} of {len(candidates)} students: the next would have taken "
                                   f"screening past its {SCREEN_SHARE:.0%} share of the time budget ({limit:.0f} s)")
                break
            if rows and not clock.allows(f"after screening {len(rows)} of {len(candidates)} students"):
                break
            t0 = time.perf_counter()
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
            last = time.perf_counter() - t0
    within = [r for r in rows if 100 * (base["accuracy"] - r["accuracy"]) <= config.max_accuracy_drop + 1e-9]
    others = sorted((r for r in rows if r not in within), key=lambda r: -r["accuracy"])
    kept = (within + others)[: config.max_students]
    for r in rows:
        r["kept"] = r in kept
    return [r["student"] for r in kept], rows



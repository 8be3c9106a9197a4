"""The advisor: "which technique should I use?" answered by measurement.

    result = slimkit.pipeline.advisor.advise(model, task, AutoConfig(max_accuracy_drop=0.5), out="auto-out")

1. Sensitivity: every layer's accuracy under sparsity, truncated rank and low-bit weights
   (`sensitivity.analyse`), on the validation split.
2. Search (Optuna, NSGA-II, three objectives: validation accuracy, bytes of the deployable file,
   latency on the target runtime) over recipes built from the registered techniques:
   distillation into a cheaper student, structured pruning to a MACs target, and a deployable
   format — fp32 ONNX, int8 QDQ ONNX, or a packed `.slim` file (unstructured sparsity + k-means
   weight sharing + zstd) that loads into a dense model. Expensive prefixes (a trained student,
   a pruned network) are computed once and shared by the trials that start with them.
3. The Pareto front, and one recommendation: among the candidates that meet every constraint on
   validation data, the one with the smallest product of size and latency relative to the original.
   It is re-run from scratch as a recipe through `compress` (test-split metrics, checkpoints,
   report), and explained in words from the measurements.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn
from pydantic import Field

from slimkit.core import registry
from slimkit.core.config import Config
from slimkit.core.io import output_dir, write_text
from slimkit.core.layers import pareto_front as front_of
from slimkit.core.progress import console
from slimkit.core.task import Task
from slimkit.errors import InfeasibleError
from slimkit.evaluate.latency import describe_speedup, speedup
from slimkit.pipeline.recipe import Constraints, Evaluation, Recipe, Stage
from slimkit.pipeline.sensitivity import analyse
from slimkit.pipeline.stage import Timed, evaluate_stage, run_stage, time_side_by_side
from slimkit.report import write_html, write_json
from slimkit.report.html import figure_png, heatmap, latency_cell

FORMATS = ("fp32", "int8", "pack")


class AutoConfig(Config):
    """What the advisor optimizes for.

    max_accuracy_drop: points of accuracy the user accepts to lose (validation during the search,
        test in the final report). max_size_kb / max_latency_ms: optional hard limits.
    runtime / latency_batch_size: where latency is measured for the search ("ort" or "torch").
    trials: recipes evaluated by the search. student_epochs / recovery_epochs: training budget of
        a student and of recovery after structured pruning. Students are trained on images shifted
        by up to one pixel (`DistillConfig.augment`), which is what lets a cheap student match its
        teacher on small data.
    max_students: students kept for the search after screening (every candidate student is trained
        twice, distilled and on the labels alone; the cheapest within the accuracy budget go on).
    """

    max_accuracy_drop: float = Field(0.5, ge=0)
    max_size_kb: float | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    runtime: Literal["ort", "torch"] = "ort"
    latency_batch_size: int = Field(64, ge=1)
    threads: int = Field(1, ge=1)
    trials: int = Field(16, ge=1)
    student_epochs: int = Field(120, ge=1)
    recovery_epochs: int = Field(10, ge=0)
    structured_targets: list[float] = Field(default_factory=lambda: [0.5, 0.35])
    sparsities: list[float] = Field(default_factory=lambda: [0.7, 0.9])
    prune_epochs: int = Field(9, ge=0)
    codebook_epochs: int = Field(2, ge=0)
    max_students: int = Field(3, ge=0)
    seed: int = 0


# -- candidate recipes --------------------------------------------------------------------------
def student_key(name: str, width: float, pool: int = 1, labels: bool = False) -> str:
    """"lenet300_100@0.5"; "@pool2" for a lower input resolution; "@labels" for a student trained on the
    hard labels instead of the model's soft targets."""
    return f"{name}@{width:g}" + (f"@pool{pool}" if pool > 1 else "") + ("@labels" if labels else "")


def parse_student(key: str) -> tuple[str, float, int, bool]:
    """(zoo name, width, input pooling, trained on labels)"""
    name, width, *rest = key.split("@")
    pool = next((int(r[len("pool"):]) for r in rest if r.startswith("pool")), 1)
    return name, float(width), pool, "labels" in rest


def student_candidates(model: nn.Module, task: Task) -> list[tuple[str, int]]:
    """Zoo students (key, MACs) at most half the model's MACs, cheapest first: every image zoo model
    at widths 0.25 / 0.5 / 1.0 and, where the model supports it, at half and quarter input
    resolution. Only for image classifiers; a model of unknown architecture gets none."""
    from slimkit import zoo
    from slimkit.evaluate import count_macs

    if task.num_classes is None or len(task.input_shape) != 3:
        return []
    macs = count_macs(model, task.example_input(1))
    found = []
    for name, entry in zoo.ZOO.items():
        if entry.kind != "image" or entry.extra:
            continue
        for width in (0.25, 0.5, 1.0):
            for pool in (1, 2, 4):
                if task.input_shape[-1] // pool < 7:
                    continue
                try:
                    kwargs = {"width": width, **({"input_pool": pool} if pool > 1 else {})}
                    student_macs = count_macs(zoo.for_task(name, task, **kwargs), task.example_input(1))
                except Exception:  # a zoo net that does not fit this input (or has no input_pool) is not a candidate
                    continue
                if student_macs <= 0.5 * macs:
                    found.append((student_key(name, width, pool), student_macs))
    found.sort(key=lambda c: c[1])
    return found


def describe_student(key: str) -> str:
    name, width, pool, _ = parse_student(key)
    return f"{name} at width {width:g}" + (f" on {pool}x{pool}-averaged input" if pool > 1 else "")


def build_stages(params: dict[str, Any], config: AutoConfig) -> list[Stage]:
    """The recipe stages of one point of the search space."""
    stages = []
    if params["student"] != "none":
        name, width, pool, labels = parse_student(params["student"])
        # alpha 0: the student learns the hard labels only (the teacher is not consulted)
        stages.append(Stage(technique="distill", config={
            "student": f"zoo:{name}", "width": width, "epochs": config.student_epochs, "lr": 2e-3,
            "alpha": 0.0 if labels else 0.9, "temperature": 4.0, "augment": "shift", "max_shift": 1, "seed": config.seed,
            **({"student_kwargs": {"input_pool": pool}} if pool > 1 else {})}))
    if params["structured"] < 1.0:
        stages.append(Stage(technique="prune_structured", config={
            "target_macs": params["structured"], "finetune_epochs": config.recovery_epochs, "lr": 2e-3,
            "recovery": "distill", "seed": config.seed}))
    if params["format"] == "int8":
        # speed_check off: the advisor times every candidate itself and never recommends one slower than the
        # original, and an "int8" candidate must be int8 (the check could hand back a float model)
        stages.append(Stage(technique="quantize", config={"weights": "int8", "activations": "uint8",
                                                          "per_channel": True, "mode": "static",
                                                          "speed_check": False}))
    elif params["format"] == "pack":
        prune = None
        if params.get("sparsity", 0.0) > 0:
            # iterative prune / fine-tune rounds: one-shot 90% with a short fine-tune cost several points
            prune = {"sparsity": params["sparsity"], "scope": "global", "schedule": "iterative", "steps": 3,
                     "finetune_epochs": config.prune_epochs, "recovery": "distill", "seed": config.seed}
        stages.append(Stage(technique="pack", config={"quantization": "kmeans", "bits": 5, "conv_bits": 8,
                                                      "codebook_epochs": config.codebook_epochs, "prune": prune,
                                                      "seed": config.seed}))
    return stages


class _Runner:
    """Evaluates search points, sharing models of common stage prefixes between trials."""

    def __init__(self, model: nn.Module, task: Task, config: AutoConfig, work: Path):
        self.model, self.task, self.config, self.work = model, task, config, work
        self.cache: dict[str, nn.Module] = {}
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
            self.cache[key] = registry.get(stage.technique).apply(parent, stage.technique_config(), task=self.task)
        return self.cache[key]

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


def search(model: nn.Module, task: Task, config: AutoConfig, work: Path) -> tuple[dict, list[dict], list[dict]]:
    """Screen students, then run the multi-objective search; returns (baseline point, trial points,
    student screening rows)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runner = _Runner(model, task, config, work)
    base_metrics = runner.evaluate(0, [])
    acc, size, lat = _objectives(base_metrics, config)
    base = {"trial": 0, "params": {"student": "none", "structured": 1.0, "format": "fp32"}, "accuracy": acc,
            "size_bytes": size, "latency_ms": lat, "stages": [], "metrics": base_metrics.to_dict()}

    kept, screening = screen_students(runner, base, config)
    students = ["none"] + kept
    structured = [1.0] + list(config.structured_targets)
    sparsities = [0.0] + list(config.sparsities)
    sampler = optuna.samplers.NSGAIISampler(seed=config.seed, population_size=max(4, config.trials // 3))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    # Start from the points most likely to be on the front: each student in int8 and packed at the
    # lowest sparsity (a student is already small), the original packed at the highest sparsity and
    # pruned to the lowest MACs target.
    lowest = sparsities[1] if len(sparsities) > 1 else 0.0
    seeds = [p for s in kept for p in ({"student": s, "structured": 1.0, "format": "int8"},
                                         {"student": s, "structured": 1.0, "format": "pack", "sparsity": lowest})]
    seeds += [{"student": "none", "structured": 1.0, "format": "pack", "sparsity": sparsities[-1]},
              {"student": "none", "structured": structured[-1], "format": "pack", "sparsity": sparsities[-1]}]
    for params in seeds[: config.trials]:
        study.enqueue_trial(params)
    points: list[dict] = []
    seen: dict[str, dict] = {}
    from slimkit.core.progress import progress_bar

    with progress_bar("advisor search", config.trials) as advance:
        for _ in range(config.trials):
            trial = study.ask()
            params = {"student": trial.suggest_categorical("student", students),
                      "structured": trial.suggest_categorical("structured", structured),
                      "format": trial.suggest_categorical("format", list(FORMATS))}
            if params["format"] == "pack":
                params["sparsity"] = trial.suggest_categorical("sparsity", sparsities)
            key = repr(sorted(params.items()))
            if key in seen:  # the sampler proposed a point already measured: reuse it
                point = seen[key]
            else:
                stages = build_stages(params, config)
                t0 = time.perf_counter()
                metrics = runner.evaluate(trial.number + 1, stages)
                a, s, latency = _objectives(metrics, config)
                point = {"trial": trial.number + 1, "params": params, "accuracy": a, "size_bytes": s,
                         "latency_ms": latency, "stages": [st.to_dict() for st in stages],
                         "metrics": metrics.to_dict(), "seconds": time.perf_counter() - t0}
                seen[key] = point
                points.append(point)
            study.tell(trial, [point["accuracy"], point["size_bytes"], point["latency_ms"]])
            advance(1, acc=point["accuracy"], kb=point["size_bytes"] / 1024)
    side_by_side(runner, base, points)
    return base, points, screening


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


def screen_students(runner: _Runner, base: dict, config: AutoConfig) -> tuple[list[str], list[dict]]:
    """Train every candidate student twice, distilled from the model (soft targets) and on the hard
    labels alone, both on shifted images, and keep the better of the two (the trained students are
    shared with the trials). Keep up to `max_students`: the cheapest within the accuracy budget on
    validation data, topped up with the most accurate of the others. Returns (kept keys, one row per
    candidate)."""
    from slimkit.core.progress import progress_bar
    from slimkit.core.trainer import accuracy

    candidates = student_candidates(runner.model, runner.task) if config.max_students else []
    rows = []
    with progress_bar("advisor: screening students", 2 * len(candidates)) as advance:
        for key, macs in candidates:
            acc = {}
            for signal, k in (("kd", key), ("labels", key + "@labels")):
                student = runner._prefix_model(build_stages({"student": k, "structured": 1.0, "format": "fp32"}, config))
                acc[signal] = accuracy(student, runner.task, "val")
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


# -- explanation --------------------------------------------------------------------------------
def _drop_at(analysis: dict, layer: str, value) -> float:
    for v, acc in analysis["curves"][layer]:
        if v == value:
            return 100 * (analysis["baseline"] - acc)
    return float("nan")


def explain(sens: dict[str, dict], base: dict, chosen: dict, points: list[dict], config: AutoConfig,
            screening: list[dict] = ()) -> list[str]:
    """Plain-language reasons, every number taken from the measurements."""
    lines = []
    if screening:
        base_macs = base["metrics"].get("macs") or 0
        within = [r for r in screening if 100 * (base["accuracy"] - r["accuracy"]) <= config.max_accuracy_drop + 1e-9]
        line = (f"{len(screening)} smaller zoo networks were trained as candidate students, each distilled from the "
                f"model and on the labels alone ({config.student_epochs} epochs on shifted copies of the training "
                f"images, the better of the two kept); {len(within)} stay within "
                f"{config.max_accuracy_drop} points on validation data")
        if within:
            best = within[0]
            share = f", {100 * best['macs'] / base_macs:.0f}% of the original's MACs" if base_macs else ""
            line += (f"; the cheapest of them, {describe_student(best['student'])} ({best['params']:,} parameters{share}), "
                     f"changes accuracy by {100 * (best['accuracy'] - base['accuracy']):+.2f} points")
        lines.append(line + ".")
        by_labels = [r for r in screening if r["labels_accuracy"] > r["kd_accuracy"]]
        if by_labels:
            lines.append(f"{len(by_labels)} of {len(screening)} students were more accurate trained on the hard labels "
                         f"than distilled from the model (mean {100 * statistics.mean(r['labels_accuracy'] for r in screening):.2f}% "
                         f"vs {100 * statistics.mean(r['kd_accuracy'] for r in screening):.2f}% on validation): the model's own "
                         "errors limit what its soft targets teach, so those students learn from the labels.")
    sp = sens["sparsity"]
    grid = [v for v, _ in next(iter(sp["curves"].values()))]
    high = 0.9 if 0.9 in grid else grid[-1]
    robust = [n for n in sp["curves"] if _drop_at(sp, n, high) <= 0.5]
    fragile = max(sp["curves"], key=lambda n: _drop_at(sp, n, high))
    if robust:
        lines.append(f"Layers {', '.join(robust)} keep accuracy within 0.5 points at {int(100 * high)}% sparsity "
                     f"(each pruned alone, validation split), so unstructured pruning and packing shrink them cheaply.")
    lines.append(f"{fragile} is the layer most sensitive to pruning: it loses {_drop_at(sp, fragile, high):.1f} points "
                 f"at {int(100 * high)}% sparsity on its own, so a global threshold prunes it least.")
    bits = sens["bits"]
    worst4 = max(bits["curves"], key=lambda n: _drop_at(bits, n, 4))
    lines.append(f"With 4-bit per-channel weights the worst layer ({worst4}) loses {_drop_at(bits, worst4, 4):.1f} points; "
                 f"at 8 bits no layer loses more than "
                 f"{max(_drop_at(bits, n, 8) for n in bits['curves']):.1f}.")
    per_tensor = sens["bits_per_tensor"]
    gaps = {n: _drop_at(per_tensor, n, 4) - _drop_at(bits, n, 4) for n in bits["curves"]}
    worst_gap = max(gaps, key=gaps.get)
    if gaps[worst_gap] > 1.0:
        lines.append(f"{worst_gap} loses {_drop_at(per_tensor, worst_gap, 4):.1f} points with one 4-bit scale per tensor "
                     f"but {_drop_at(bits, worst_gap, 4):.1f} with per-channel scales, so per-channel scales are used.")
    rank = sens["rank"]
    low_rank_ok = [n for n in rank["curves"] if _drop_at(rank, n, 0.8) <= 0.5]
    if low_rank_ok:
        lines.append(f"Layers {', '.join(low_rank_ok)} keep accuracy with 80% of their singular-value energy.")

    # runtime facts from the trials: int8 vs fp32 on the same network
    for p in points:
        if p["params"]["format"] == "int8":
            twin = next((q for q in points if q["params"]["format"] == "fp32" and q["params"]["student"] == p["params"]["student"]
                         and q["params"]["structured"] == p["params"]["structured"]), None)
            ref = twin or (base if p["params"]["student"] == "none" and p["params"]["structured"] == 1.0 else None)
            if ref is not None and "timing" in ref and "timing" in p:
                s = speedup(ref["timing"], p["timing"])  # both from the one side-by-side comparison
                why = (" (on layers this small the quantize/dequantize overhead decides)"
                       if s["reliable"] and s["speedup"] < 1 else "")
                lines.append(f"int8 QDQ in {config.runtime} ran {describe_speedup(s, 'fp32 on the same network')} "
                             f"(batch {config.latency_batch_size}, {config.threads} thread, timed side by side){why}.")
                break
    size_x = base["size_bytes"] / chosen["size_bytes"]
    drop = 100 * (base["accuracy"] - chosen["accuracy"])
    desc = describe(chosen["params"])
    lines.append(f"Recommended: {desc}. On validation data it is {size_x:.1f}x smaller on disk and "
                 f"{_speed_words(chosen)} in {config.runtime} (batch {config.latency_batch_size}, timed side by side "
                 f"with the original), accuracy {-drop:+.2f} points (budget: a drop of at most {config.max_accuracy_drop}).")
    if chosen["params"]["format"] == "pack":
        lines.append("The packed .slim file is what ships; slimkit.load() unpacks it into a dense model, which runs in "
                     "ONNX Runtime as fp32 (the latency above is that model's).")
    return lines


def _speed_words(point: dict) -> str:
    """'2.3x faster (2.1-2.5x across rounds)' from the point's side-by-side timing against the original."""
    vs = (point.get("timing") or {}).get("vs_baseline")
    if vs is None:
        return "of unmeasured speed"
    return describe_speedup(vs)


def _faster_cell(point: dict) -> str:
    vs = (point.get("timing") or {}).get("vs_baseline")
    if vs is None:
        return ""
    return f"{vs['speedup']:.1f}" if vs["reliable"] else f"<span title='{describe_speedup(vs)}'>&asymp;1</span>"


def describe(params: dict) -> str:
    parts = []
    if params["student"] != "none":
        student = describe_student(params["student"])
        parts.append(f"train {student} on the labels" if parse_student(params["student"])[3] else f"distill into {student}")
    if params["structured"] < 1.0:
        parts.append(f"remove channels down to {int(100 * params['structured'])}% of the MACs")
    if params["format"] == "int8":
        parts.append("int8 static quantization (ONNX QDQ, per-channel)")
    elif params["format"] == "pack":
        sp = params.get("sparsity", 0.0)
        parts.append((f"prune {int(100 * sp)}% of the weights, " if sp else "") + "5/8-bit k-means weight sharing, "
                     "packed .slim")
    else:
        parts.append("fp32 ONNX")
    return ", then ".join(parts)


# -- plots --------------------------------------------------------------------------------------
def pareto_plot(base: dict, points: list[dict], front: list[dict], chosen: dict | None, x: str, xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[x] for p in points], [100 * p["accuracy"] for p in points], c="#bbbbbb", label="trials")
    front_sorted = sorted(front, key=lambda p: p[x])
    ax.plot([p[x] for p in front_sorted], [100 * p["accuracy"] for p in front_sorted], "o-", c="#1f77b4", label="Pareto front")
    ax.scatter([base[x]], [100 * base["accuracy"]], marker="s", c="k", label="original")
    if chosen is not None:
        ax.scatter([chosen[x]], [100 * chosen["accuracy"]], marker="*", s=200, c="#d62728", label="recommended")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _trials_table(base: dict, points: list[dict], front: list[dict], chosen: dict | None) -> str:
    import html

    rows = ["<tr><th>trial</th><th class=l>recipe</th><th>val accuracy</th><th>&Delta; pts</th><th>bytes</th>"
            "<th>&times; smaller</th><th>latency ms</th><th>&times; faster</th><th>Pareto</th></tr>"]
    for p in [base] + sorted(points, key=lambda p: p["trial"]):
        mark = "&#9733;" if chosen is p else ("&#9679;" if p in front else "")
        rows.append(f"<tr><td>{p['trial']}</td><td class=l>{html.escape(describe(p['params']) if p is not base else 'original (fp32 ONNX)')}</td>"
                    f"<td>{100 * p['accuracy']:.2f}%</td><td>{100 * (p['accuracy'] - base['accuracy']):+.2f}</td>"
                    f"<td>{int(p['size_bytes']):,}</td><td>{base['size_bytes'] / p['size_bytes']:.1f}</td>"
                    f"{latency_cell(p.get('timing') or {'median_ms': p['latency_ms']})}"
                    f"<td>{_faster_cell(p) if p is not base else '1.0'}</td><td>{mark}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _screening_table(base: dict, rows: list[dict]) -> str:
    import html

    out = ["<table><tr><th class=l>student</th><th>parameters</th><th>MACs</th><th>val acc. distilled</th>"
           "<th>val acc. labels only</th><th>&Delta; pts (better)</th><th>kept for the search</th></tr>"]
    for r in rows:
        out.append(f"<tr><td class=l>{html.escape(describe_student(r['student']))}</td><td>{r['params']:,}</td>"
                   f"<td>{r['macs']:,}</td><td>{100 * r['kd_accuracy']:.2f}%</td><td>{100 * r['labels_accuracy']:.2f}%</td>"
                   f"<td>{100 * (r['accuracy'] - base['accuracy']):+.2f}</td><td>{'yes' if r['kept'] else ''}</td></tr>")
    return "".join(out) + "</table>"


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
    console.print("[bold]advisor[/bold]: per-layer sensitivity (sparsity, rank, bit width)")
    sens = analyse(model, task)
    console.print(f"[bold]advisor[/bold]: searching {config.trials} recipes")
    base, points, screening = search(model, task, config, work)
    front = pareto_front(points + [base])
    candidates = sorted((p for p in points if feasible(p, base, config)), key=lambda p: score(p, base))
    chosen = candidates[0] if candidates else None
    sections = _search_sections(base, points, front, chosen, screening, sens, config)
    if chosen is None:  # still show what was measured, then say why nothing qualified
        from slimkit.report import new_result

        result = new_result({"name": model_name or type(model).__name__, "source": model_name},
                            {"name": task.name, "splits": task.info.get("splits"), "input_shape": list(task.input_shape)})
        result["sections"].update(sections)
        result["sections"]["advisor"] = {"config": config.to_dict(), "seconds": time.perf_counter() - t0,
                                         "recommendation": None}
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
    reasons = explain(sens, base, chosen, points, config, screening)
    recipe = Recipe(name="auto", seed=config.seed, stages=[Stage.from_dict(s) for s in chosen["stages"]],
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
    result["sections"]["advisor"] = {"config": config.to_dict(), "seconds": time.perf_counter() - t0}
    write_json(result, out / "result.json")
    write_html(result, out / "report.html")
    return result


def _search_sections(base, points, front, chosen, screening, sens, config: AutoConfig) -> dict[str, dict]:
    """Report sections of the search: Pareto plots and trial table, student screening, heatmaps."""
    sections = {}
    plots = [pareto_plot(base, points, front, chosen, "size_bytes", "bytes on disk (log)"),
             pareto_plot(base, points, front, chosen, "latency_ms",
                         f"latency ms, {config.runtime}, batch {config.latency_batch_size} (log)")]
    sections["pareto front (validation split)"] = {
        "html": "<div class=plots>" + "".join(f'<img alt="Pareto plot" src="{p}">' for p in plots) + "</div>"
                + _trials_table(base, points, front, chosen),
        "baseline": base, "trials": points, "front": [p["trial"] for p in front]}
    if screening:
        sections["student screening (validation split)"] = {
            "html": _screening_table(base, screening), "students": screening}
    maps = [heatmap(sens["sparsity"], "accuracy drop vs sparsity (one layer at a time)", "sparsity"),
            heatmap(sens["rank"], "accuracy drop vs kept SVD energy", "energy kept"),
            heatmap(sens["bits"], "accuracy drop vs weight bits (per-channel)", "bits")]
    sections["per-layer sensitivity"] = {
        "html": "<div class=plots>" + "".join(f'<img alt="sensitivity heatmap" src="{m}">' for m in maps) + "</div>",
        "analysis": sens}
    return sections

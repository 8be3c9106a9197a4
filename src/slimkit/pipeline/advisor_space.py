"""The advisor's search space: its config, the candidate students, the techniques' own candidates, and the
recipe a point of the space stands for (`build_stages`).

A point is {"student": zoo student key or "none", <technique>: candidate label or "none" for every
registered technique that offers candidates and may be followed by others, "format": "fp32" or
"<technique>:<label>" of a final technique (quantize, pack: a model has one output format)}. The students
are the advisor's own dimension (zoo architectures, each screened by training it); every other dimension
comes from `Technique.candidates`, so a newly registered technique joins the search without edits here.
"""
from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn
from pydantic import Field

from slimkit.core.config import Config
from slimkit.core.task import Task
from slimkit.pipeline.recipe import Stage

FP32 = "fp32"


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
    screen_images: the search (student screening and every trial) trains on at most this many
        training images (a fixed random subset; validation stays whole); the recommendation is then
        rebuilt on all of them with its epochs scaled by subset / full size, so it sees as many
        examples as in the search. None: the search uses every image.
    time_budget_s: wall-clock budget of the whole run (CLI `--time-budget 10m`); the search stops
        starting trials when what remains would not cover rebuilding the most expensive recipe seen.
    finalists: after a search on a subset, this many of its points (smaller and faster than the
        original, most accurate first) are rebuilt on all the training images and judged by those
        figures: a student or a recovery trained on a fifth of the data is not what the user gets.
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
    screen_images: int | None = Field(2000, ge=100)
    time_budget_s: float | None = Field(None, gt=0)
    finalists: int = Field(3, ge=0)
    seed: int = 0


def scaled_epochs(epochs: int, scale: float) -> int:
    """Epochs on the full data that see as many examples as `epochs` on the screening subset."""
    return 0 if epochs <= 0 else max(1, round(epochs * scale))


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


def technique_space(config: AutoConfig) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """(non-final dimensions {technique: {label: config}}, formats {"technique:label": config}) that the
    registered techniques offer for `config`'s budgets, in the techniques' order."""
    from slimkit.core import registry

    dims: dict[str, dict[str, dict]] = {}
    formats: dict[str, dict] = {}
    for t in registry.techniques():
        if t.candidates is None:
            continue
        offered = t.candidates(config)
        if t.next == ():
            formats.update({f"{t.name}:{label}": cfg for label, cfg in offered.items()})
        elif offered:
            dims[t.name] = offered
    return dims, formats


def base_params(config: AutoConfig, student: str = "none") -> dict[str, str]:
    """The point that changes nothing but (optionally) the student."""
    dims, _ = technique_space(config)
    return {"student": student, **{name: "none" for name in dims}, "format": FP32}


def build_stages(params: dict[str, Any], config: AutoConfig, scale: float = 1.0) -> list[Stage]:
    """The recipe stages of one point of the search space; `scale` multiplies every training budget
    (the rebuild on the full data after a search on a subset). Dimensions missing from `params` are
    "none" (format: fp32)."""
    config = config.model_copy(update={k: scaled_epochs(getattr(config, k), scale) for k in
                                       ("student_epochs", "recovery_epochs", "prune_epochs", "codebook_epochs")})
    stages = []
    student = params.get("student", "none")
    if student != "none":
        name, width, pool, labels = parse_student(student)
        # alpha 0: the student learns the hard labels only (the teacher is not consulted)
        stages.append(Stage(technique="distill", config={
            "student": f"zoo:{name}", "width": width, "epochs": config.student_epochs, "lr": 2e-3,
            "alpha": 0.0 if labels else 0.9, "temperature": 4.0, "augment": "shift", "max_shift": 1, "seed": config.seed,
            **({"student_kwargs": {"input_pool": pool}} if pool > 1 else {})}))
    dims, formats = technique_space(config)
    for name, offered in dims.items():
        label = params.get(name, "none")
        if label != "none":
            stages.append(Stage(technique=name, config=offered[label]))
    fmt = params.get("format", FP32)
    if fmt != FP32:
        stages.append(Stage(technique=fmt.split(":", 1)[0], config=formats[fmt]))
    return stages


def describe_params(params: dict[str, Any]) -> str:
    """A point of the space in words: each technique's own description of its candidate."""
    from slimkit.core import registry

    parts = []
    student = params.get("student", "none")
    if student != "none":
        parts.append(f"train {describe_student(student)} on the labels" if parse_student(student)[3]
                     else f"distill into {describe_student(student)}")
    for name, label in params.items():
        if name in ("student", "format") or label == "none":
            continue
        parts.append(_describe(registry.get(name), label))
    fmt = params.get("format", FP32)
    if fmt == FP32:
        parts.append("fp32 ONNX")
    else:
        name, label = fmt.split(":", 1)
        parts.append(_describe(registry.get(name), label))
    return ", then ".join(parts)


def _describe(technique, label: str) -> str:
    return technique.describe(label) if technique.describe is not None else f"{technique.name} ({label})"

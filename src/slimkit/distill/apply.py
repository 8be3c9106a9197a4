"""`distill(student, teacher, task=..., config=...)` and the registered "distill" technique.

As a verb it trains the given student against a frozen teacher. As a stage (recipes, demo, CLI) the
input model is the teacher by default and the student is a smaller zoo model (`student="zoo:NAME"`,
`width=...`) or a copy of the input model.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from slimkit.core import registry
from slimkit.core.registry import Technique, chained
from slimkit.core.state import copy_model, get_state, record_stage
from slimkit.core.task import Task
from slimkit.core.trainer import TrainConfig, fit, resolve_device
from slimkit.distill.augment import random_shift
from slimkit.distill.config import DistillConfig
from slimkit.distill.losses import attention_loss, hint_loss, soft_target_loss
from slimkit.distill.modules import (
    FeatureCapture,
    check_attention_shapes,
    make_adapter,
    resolve_links,
)
from slimkit.distill.teacher import FrozenTeacher
from slimkit.errors import ConfigError, ModelError

StepHook = Callable[[nn.Module, int], None]


def _logits(output, who: str, model: nn.Module) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(f"distillation needs class logits (batch, classes); the {who} {type(model).__name__} "
                         f"returns {shape}")
    return output


@torch.no_grad()
def _probe(student: nn.Module, teacher: FrozenTeacher, task: Task, pairs) -> dict[str, tuple]:
    """One forward pass on two real examples: check the class counts, record feature shapes.

    The student runs in eval mode so BatchNorm statistics are not touched by the probe."""
    x = task.example_input(2)
    s_names = [s for s, _, _ in pairs]
    was_training = student.training
    student.eval()
    try:
        with FeatureCapture(student, s_names, detach=True) as cap:
            s_out = _logits(student(x.to(next((p.device for p in student.parameters()), x.device))), "student", student)
        t_out, feats = teacher.run(x)  # not through the cache: probe examples are not training examples
        t_feats = dict(zip(teacher.feature_names, feats))
        _logits(t_out, "teacher", teacher.model)
    finally:
        student.train(was_training)
    if s_out.shape[1] != t_out.shape[1]:
        raise ModelError(f"teacher {type(teacher.model).__name__} predicts {t_out.shape[1]} classes but student "
                         f"{type(student).__name__} predicts {s_out.shape[1]}; both must share the same classes")
    if task.num_classes is not None and s_out.shape[1] != task.num_classes:
        raise ModelError(f"student {type(student).__name__} predicts {s_out.shape[1]} classes but data set "
                         f"{task.name!r} has {task.num_classes}")
    shapes = {f"s:{n}": tuple(v.shape) for n, v in cap.outputs.items()}
    shapes.update({f"t:{n}": tuple(v.shape) for n, v in t_feats.items()})
    return shapes


def _check_inputs(student, teacher, task, config) -> None:
    if not isinstance(student, nn.Module):
        raise ModelError(f"distill: the student must be a torch.nn.Module, got {type(student).__name__}")
    if not isinstance(teacher, nn.Module):
        raise ModelError(f"distill: the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if not isinstance(task, Task):
        raise ConfigError("distill needs task=Task (the transfer set), e.g. slimkit.data.digits()")
    if task.metric != "accuracy":
        raise ConfigError(f"soft-target distillation needs a classification task; {task.name!r} uses "
                          f"metric {task.metric!r}")
    if not isinstance(config, DistillConfig):
        raise ConfigError(f"distill: config must be a DistillConfig, got {type(config).__name__}")


def train_student(student: nn.Module, teacher: nn.Module, task: Task, config: DistillConfig, *,
                  on_step: StepHook | None = None, on_epoch: StepHook | None = None,
                  description: str = "distill") -> tuple[nn.Module, dict]:
    """Train a copy of `student` against frozen `teacher` on the shared trainer.

    Returns (trained student, info) where info holds the teacher's forward-pass count and cache
    hits. The inputs are never modified. Used by `distill` (which records the stage) and by
    `recover` (the recovery step of other techniques, which record their own stage).
    """
    _check_inputs(student, teacher, task, config)
    if config.tuned:
        return train_tuned(student, teacher, task, config, on_step=on_step, on_epoch=on_epoch, description=description)
    if config.augment == "shift" and task.example_input(1).dim() != 4:
        raise ConfigError(f"augment='shift' needs image inputs (channels, height, width); data set {task.name!r} "
                          f"gives {tuple(task.example_input(1).shape[1:])}")
    device = resolve_device(config.device)
    teacher_device = resolve_device(config.teacher_device) if config.teacher_device else device
    student = copy_model(student)
    pairs = resolve_links(student, teacher, config.features)
    runner = FrozenTeacher(teacher, teacher_device, feature_names=[t for _, t, _ in pairs],
                           cache=config.cache_teacher)
    capture = None
    try:
        shapes = _probe(student, runner, task, pairs)
        adapters = nn.ModuleList()
        for s_name, t_name, link in pairs:
            s_shape, t_shape = shapes[f"s:{s_name}"], shapes[f"t:{t_name}"]
            if link.kind == "attention":
                check_attention_shapes(s_shape, t_shape, student_name=s_name, teacher_name=t_name)
                adapters.append(nn.Identity())
            else:
                adapters.append(make_adapter(s_shape, t_shape, student_name=s_name, teacher_name=t_name))
        adapters.to(device)
        capture = FeatureCapture(student, [s for s, _, _ in pairs])
        need_teacher = config.alpha > 0 or bool(pairs)  # alpha=0 without features is plain cross-entropy
        temperature, alpha = config.temperature, config.alpha

        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if config.augment == "shift":
                x = random_shift(x, config.max_shift)
            logits = model(x)
            if not need_teacher:
                return task.loss(logits, y)
            t_logits, t_feats = runner(x)
            value = soft_target_loss(logits, t_logits, y, temperature=temperature, alpha=alpha)
            for (s_name, t_name, link), adapter in zip(pairs, adapters):
                s_feat, t_feat = capture.outputs[s_name], t_feats[t_name]
                if link.kind == "hint":
                    value = value + link.weight * hint_loss(adapter(s_feat), t_feat)
                else:
                    value = value + link.weight * attention_loss(s_feat, t_feat)
            return value

        train_cfg = TrainConfig(epochs=config.epochs, lr=config.lr, optimizer=config.optimizer,
                                weight_decay=config.weight_decay, batch_size=config.batch_size,
                                seed=config.seed, device=str(device), patience=resolved_patience(config, task))
        result = fit(student, task, train_cfg, loss=loss, extra_parameters=list(adapters.parameters()),
                     on_step=on_step, on_epoch=on_epoch, description=description, in_place=True)
    finally:
        if capture is not None:
            capture.remove()
        runner.close()
    info = {"teacher_calls": runner.calls, "cache_hits": runner.hits, "cache_misses": runner.misses,
            "history": result.history, "adapters": sum(p.numel() for p in adapters.parameters()),
            "config": config, "tuning": None, "patience": train_cfg.patience,
            "best_epoch": result.best_epoch if train_cfg.patience else None}
    return result.model, info


def resolved_patience(config: DistillConfig, task: Task) -> int | None:
    """Early-stopping patience of a run: "auto" is max(5, epochs // 3) where there is a validation split."""
    from slimkit.core.trainer import auto_patience

    return auto_patience(config.patience, config.epochs, task)


def train_tuned(student: nn.Module, teacher: nn.Module, task: Task, config: DistillConfig, *,
                on_step: StepHook | None = None, on_epoch: StepHook | None = None,
                description: str = "distill") -> tuple[nn.Module, dict]:
    """`train_student` with the "auto" temperature / alpha of `config` chosen on the validation split:
    1. screening: one short run (`tune_epochs`) per (T, alpha) candidate of the grid, from the same
       initialization and seed; the best validation accuracy wins (grid order breaks ties);
    2. when alpha is "auto", the winner and label training (alpha=0) both run the full schedule and the
       better on validation is returned — the labels on a tie. KD-versus-labels is decided at the real
       budget because short runs favour the labels (they converge faster; KD's gain comes late).
    A task without a validation split gets T=4, alpha=0.9 (noted)."""
    from slimkit.core.trainer import accuracy

    def resolved(temperature, alpha, **extra) -> DistillConfig:
        return DistillConfig(**{**config.to_dict(), "temperature": temperature, "alpha": alpha, **extra})

    if task.val is None:
        fixed = resolved(4.0 if config.temperature == "auto" else config.temperature,
                         0.9 if config.alpha == "auto" else config.alpha)
        model, info = train_student(student, teacher, task, fixed, on_step=on_step, on_epoch=on_epoch,
                                    description=description)
        info["tuning"] = {"tuned": False, "reason": f"data set {task.name!r} has no validation split",
                          "temperature": fixed.temperature, "alpha": fixed.alpha}
        return model, info
    grid = list(dict.fromkeys(
        (config.temperature if config.temperature != "auto" else t, config.alpha if config.alpha != "auto" else a)
        for t, a in config.tune_grid))
    epochs = config.tune_epochs or max(1, config.epochs // 4)
    screened = []
    if len(grid) > 1:
        for t, a in grid:
            short = resolved(t, a, epochs=epochs, patience=None)
            model, _ = train_student(student, teacher, task, short, on_step=on_step, description=f"tune T={t:g} alpha={a:g}")
            screened.append({"temperature": t, "alpha": a, "val_accuracy": accuracy(model, task, "val")})
        top = max(r["val_accuracy"] for r in screened)
        t, a = next((r["temperature"], r["alpha"]) for r in screened if r["val_accuracy"] == top)
    else:
        t, a = grid[0]
    model, info = train_student(student, teacher, task, resolved(t, a), on_step=on_step, on_epoch=on_epoch,
                                description=description)
    final = [{"temperature": t, "alpha": a, "val_accuracy": accuracy(model, task, "val"), "epochs": len(info["history"])}]
    if config.alpha == "auto":
        labels, labels_info = train_student(student, teacher, task, resolved(t, 0.0), on_step=on_step,
                                            on_epoch=on_epoch, description=f"{description} (labels alone)")
        final.append({"temperature": t, "alpha": 0.0, "val_accuracy": accuracy(labels, task, "val"),
                      "epochs": len(labels_info["history"])})
        if final[1]["val_accuracy"] >= final[0]["val_accuracy"]:
            model, info = labels, labels_info
    info["tuning"] = {"tuned": True, "epochs": epochs, "trials": screened, "final": final,
                      "temperature": info["config"].temperature, "alpha": info["config"].alpha,
                      "val_images": len(task.val)}
    return model, info


def _tuning_note(tuning: dict) -> str:
    if not tuning["tuned"]:
        return (f"temperature/alpha not tuned ({tuning['reason']}): T={tuning['temperature']:g}, "
                f"alpha={tuning['alpha']:g}")

    def name(r):
        return "labels" if r["alpha"] == 0 else f"T={r['temperature']:g}/a={r['alpha']:g}"

    parts = []
    if tuning["trials"]:
        parts.append(f"screened {len(tuning['trials'])} soft-target settings for {tuning['epochs']} epochs each: "
                     + ", ".join(f"{name(r)} {100 * r['val_accuracy']:.2f}%" for r in tuning["trials"]))
    final = tuning["final"]
    parts.append("full runs: " + ", ".join(f"{name(r)} {100 * r['val_accuracy']:.2f}%" for r in final))
    text = f"soft targets tuned on the validation split ({tuning['val_images']} examples): " + "; ".join(parts)
    if tuning["alpha"] == 0:
        return text + (f"; knowledge distillation did not beat the hard labels there ({name(final[0])} "
                       f"{100 * final[0]['val_accuracy']:.2f}% vs labels {100 * final[1]['val_accuracy']:.2f}%), "
                       "so the student trained on the labels alone is returned")
    return text + f"; chose T={tuning['temperature']:g}, alpha={tuning['alpha']:g}"


def distill(student: nn.Module, teacher: nn.Module, *, task: Task, config: DistillConfig | None = None,
            on_step: StepHook | None = None, on_epoch: StepHook | None = None) -> nn.Module:
    """Distill `teacher` into `student`; returns a new trained student (neither input is modified).

        small = slimkit.distill(small, teacher=model, task=task, config=slimkit.DistillConfig(temperature=4))

    The student may be any model with the teacher's classes: your own, a narrower zoo model, or the
    output of another technique (pruned, factorized, separable, QAT). `config.features` adds FitNets
    hints / attention transfer between named layers. Also available as `slimkit.distill_model`.
    """
    config = config or DistillConfig()
    if isinstance(config, DistillConfig) and config.student is not None:
        raise ConfigError(f"DistillConfig.student={config.student!r} builds a student when distillation runs as a "
                          "stage; this call already passes a student model, so leave config.student unset")
    trained, info = train_student(student, teacher, task, config, on_step=on_step, on_epoch=on_epoch)
    return _finish(trained, teacher, config, info)


def _finish(trained: nn.Module, teacher: nn.Module, config: DistillConfig, info: dict) -> nn.Module:
    teacher_source = get_state(teacher).get("source")
    used = info["config"]  # the numbers that ran ("auto" resolved)
    structure = {"teacher": type(teacher).__name__, "teacher_source": teacher_source,
                 "temperature": used.temperature, "alpha": used.alpha, "best_epoch": info["best_epoch"]}
    if info["tuning"] is not None:
        structure["tuning"] = info["tuning"]
    record_stage(trained, "distill", config, structure)
    notes = list(getattr(trained, "slimkit_notes", []) or [])
    if info["tuning"] is not None:
        notes.append(_tuning_note(info["tuning"]))
    extras = [f"inputs shifted by up to {used.max_shift} px"] if used.augment == "shift" else []
    extras += [f"{len(used.features)} feature links"] if used.features else []
    ran = len(info["history"])
    epochs = [f"{ran} epochs" + (f" (early stopping, patience {info['patience']}: best validation epoch "
                                 f"{info['best_epoch']} kept)" if info["best_epoch"] is not None else "")]
    if used.alpha == 0 and not used.features:
        notes.append(f"trained on the hard labels only (alpha=0: {type(teacher).__name__} was not consulted, "
                     + ", ".join(epochs + extras) + ")")
    else:
        notes.append(f"distilled from {type(teacher).__name__} (T={used.temperature:g}, alpha={used.alpha:g}, "
                     + ", ".join(epochs + extras) + ")")
    if config.cache_teacher:
        seen = info["cache_hits"] + info["cache_misses"]
        notes.append(f"teacher outputs cached: teacher ran {info['teacher_calls']} batches, "
                     f"{info['cache_hits']}/{seen} examples served from the cache")
    trained.slimkit_notes = notes
    return trained


def build_student(model: nn.Module, config: DistillConfig, task: Task) -> nn.Module:
    """The student of a distill stage: a zoo model for the task (config.student="zoo:NAME", scaled by
    config.width), or a copy of `model` when config.student is None."""
    if config.student is None:
        if config.width != 1.0 or config.student_kwargs:
            raise ConfigError("DistillConfig.width/student_kwargs apply to a zoo student; set student='zoo:NAME'")
        return copy_model(model)
    from slimkit import zoo

    kwargs = dict(config.student_kwargs)
    if config.width != 1.0:
        kwargs.setdefault("width", config.width)
    return zoo.for_task(config.student[len("zoo:"):], task, seed=config.seed, **kwargs)


@chained("distill")
def apply_distill(model: nn.Module, config: DistillConfig, *, task: Task | None = None,
           teacher: nn.Module | None = None) -> nn.Module:
    """Registered apply: the input model is the teacher unless `teacher` is given."""
    if task is None:
        raise ConfigError("the distill stage needs data (task=...): distillation trains the student")
    teacher = teacher if teacher is not None else model
    student = build_student(model, config, task)
    trained, info = train_student(student, teacher, task, config)
    return _finish(trained, teacher, config, info)


def _demo(model: nn.Module, task: Task) -> DistillConfig:
    # Half-width LeNet-5 (about a quarter of the parameters) taught by the trained LeNet-5.
    return DistillConfig(student="zoo:lenet5", width=0.5, epochs=15, lr=3e-3, temperature=4.0, alpha=0.7,
                         cache_teacher=True)


registry.register(Technique(
    name="distill", family="distill", config_cls=DistillConfig, apply=apply_distill,
    summary="knowledge distillation: soft targets (temperature, alpha), FitNets hints, attention transfer",
    restore=None, demo=_demo, runtime="torch", order=45,
))

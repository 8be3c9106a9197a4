"""`slimkit distill --teacher MODEL --student MODEL --data D`: train a student from a teacher's soft targets."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import TrustFactoryOpt, parse_patience

from slimkit.errors import ConfigError


def parse_feature(spec: str):
    """`STUDENT_LAYER=TEACHER_LAYER[:hint|:attention][@WEIGHT]` -> FeatureLink."""
    from slimkit.distill.config import FeatureLink

    body, _, weight = spec.partition("@")
    pair, _, kind = body.partition(":")
    student, sep, teacher = pair.partition("=")
    if not sep or not student or not teacher:
        raise ConfigError(f"--feature {spec!r}: use STUDENT_LAYER=TEACHER_LAYER[:hint|:attention][@WEIGHT]")
    fields = {"student": student, "teacher": teacher, "kind": kind or "hint"}
    if weight:
        try:
            fields["weight"] = float(weight)
        except ValueError:
            raise ConfigError(f"--feature {spec!r}: weight {weight!r} is not a number") from None
    try:
        return FeatureLink(**fields)
    except ConfigError as err:
        raise ConfigError(f"--feature {spec!r}: {err}") from None


def _number_or_auto(value: str, option: str, kind=float):
    if value == "auto":
        return value
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{option}: expected a number or 'auto', got {value!r}") from None


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill_command(
        teacher: str = typer.Option(..., "--teacher", help="teacher: a saved model, zoo:NAME with --teacher-weights, "
                                                            "or package.module:factory with --teacher-weights"),
        student: str = typer.Option(..., "--student", help="student: zoo:NAME (built for the data, scaled by --width), "
                                                            "a saved model, or package.module:factory with --student-weights"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="safetensors weights for the teacher"),
        student_weights: Optional[str] = typer.Option(None, "--student-weights", help="safetensors weights for the student"),
        trust_factory: bool = TrustFactoryOpt,
        width: float = typer.Option(1.0, help="width multiplier of a zoo student"),
        temperature: str = typer.Option("auto", help="softmax temperature T of the soft targets, or auto (chosen on "
                                                     "the validation split)"),
        alpha: str = typer.Option("auto", help="weight of the soft-target term (1 - alpha on the hard labels), or auto "
                                               "(chosen on validation; the labels alone when KD does not help)"),
        epochs: int = typer.Option(10, help="training epochs (at most: early stopping on validation, --patience)"),
        patience: str = typer.Option("auto", help="early-stopping patience in epochs, auto, or none"),
        lr: float = typer.Option(1e-3, help="learning rate"),
        feature: list[str] = typer.Option([], "--feature", help="feature link STUDENT=TEACHER[:hint|:attention][@W] "
                                                                "(layer name patterns; repeatable)"),
        cache_teacher: bool = typer.Option(False, "--cache-teacher", help="reuse teacher outputs for repeated inputs"),
        augment: str = typer.Option("none", help="none | shift: train on images shifted by up to --max-shift pixels"),
        max_shift: int = typer.Option(2, help="largest shift in pixels with --augment shift"),
        seed: int = typer.Option(0, help="random seed"),
        device: str = typer.Option("auto", help="student device: auto | cpu | cuda"),
        teacher_device: Optional[str] = typer.Option(None, help="teacher device (default: the student's)"),
        config: Optional[Path] = typer.Option(None, "--config", help="DistillConfig as YAML/JSON (replaces the options "
                                                                     "above except --student/--width)"),
        out: Path = typer.Option(Path("slimkit-out/student.safetensors"), "--out", "-o", help="where to save the student"),
    ) -> None:
        """Distill TEACHER into STUDENT on a data set; save the student and print both test accuracies."""
        from slimkit.cli.common import random_init, console, load_model, load_task
        from slimkit.core.artifact import save
        from slimkit.core.io import output_file
        from slimkit.distill.apply import apply_distill, distill
        from slimkit.distill.config import DistillConfig
        from slimkit.evaluate import count_params, predict, topk_accuracy

        if config is not None:
            cfg = DistillConfig.from_file(config)
        else:
            cfg = DistillConfig(temperature=_number_or_auto(temperature, "--temperature"),
                                alpha=_number_or_auto(alpha, "--alpha"), epochs=epochs, lr=lr, seed=seed, device=device,
                                patience=parse_patience(patience),
                                teacher_device=teacher_device, cache_teacher=cache_teacher, augment=augment,
                                max_shift=max_shift, features=[parse_feature(f) for f in feature])
        if teacher.startswith("zoo:") and not teacher_weights and random_init(teacher[4:]):
            raise ConfigError(f"--teacher {teacher} has no trained weights: a random teacher teaches nothing; pass "
                              "--teacher-weights FILE or a saved model")
        output_file(out)  # before training: an unwritable --out must not cost the run
        task = load_task(data)
        teacher_model = load_model(teacher, weights=teacher_weights, task=task, trust_factory=trust_factory)
        if student.startswith("zoo:") and not student_weights:
            # a fresh zoo student is built by the stage itself, shaped for the data and scaled by --width
            cfg = DistillConfig(**{**cfg.to_dict(), "student": student, "width": width})
            trained = apply_distill(teacher_model, cfg, task=task)
        else:
            if width != 1.0:
                raise ConfigError("--width scales a fresh zoo student (--student zoo:NAME without --student-weights)")
            trained = distill(load_model(student, weights=student_weights, task=task, trust_factory=trust_factory), teacher_model, task=task,
                              config=cfg)
        path = save(trained, out)
        for name, model in (("teacher", teacher_model), ("student", trained)):
            acc = topk_accuracy(*predict(model, task, "test"))["top1"]
            console.print(f"{name}: test accuracy {100 * acc:.2f}%, {count_params(model)['params']:,} params")
        console.print(f"saved {path} ({path.stat().st_size:,} bytes)")

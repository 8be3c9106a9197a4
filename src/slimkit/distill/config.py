"""Distillation configs: soft targets (temperature, alpha), feature links, the student, training."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from slimkit.core.config import Config


class FeatureLink(Config):
    """One teacher -> student feature pairing.

    student / teacher: fnmatch patterns on module names (`"features.3"`, `"layers.*.conv2"`). Each
    must match at least one layer, both the same number; matches are paired in model order.
    kind: "hint" (FitNets: MSE between the teacher's feature and the student's feature mapped by a
        learned 1x1 conv / linear adapter when the shapes differ) or "attention" (attention transfer:
        distance between L2-normalized spatial attention maps sum_c |A_c|^2; conv features only).
    weight: multiplier of this link's loss, added to the soft-target loss.
    """

    student: str
    teacher: str
    kind: Literal["hint", "attention"] = "hint"
    weight: float = Field(1.0, gt=0)

    @field_validator("student", "teacher")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("layer pattern must not be empty")
        return value


class DistillConfig(Config):
    """Knowledge distillation (Hinton et al. 2015) with optional feature distillation.

    temperature, alpha: loss = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y).
        "auto" (the default for both): chosen on the task's validation split (`apply.train_tuned`). Each
        (T, alpha) of `tune_grid` (a fixed temperature or alpha narrows it) trains the student for
        `tune_epochs` (default epochs // 4, at least 1) from the same initialization; the best on validation
        then runs the full schedule, and when alpha is "auto" so does label training (alpha=0): the better
        of the two on validation is returned, the labels on a tie, so KD is used only where it measurably
        helps, and the notes say which ran. Cost with the default grid: about 3.25 full runs (1.25 of
        screening, two full). A task without a validation split gets T=4, alpha=0.9, untuned (noted).
    patience: early stopping on validation accuracy (the best epoch's weights are kept); "auto": on
        with patience max(5, epochs // 3) when the task has a validation split, so `epochs` is a maximum;
        None: train exactly `epochs`.
    epochs, lr, optimizer, weight_decay, batch_size, seed, device: the shared trainer's settings.
    teacher_device: where the frozen teacher runs (None: the student's device), e.g. a big teacher
        on "cuda" and a student on "cpu", or the other way round.
    features: FitNets hints / attention-transfer links (see `FeatureLink`).
    cache_teacher: keep the teacher's logits for inputs already seen (valid for fixed inputs, i.e.
        no random augmentation), so the teacher runs once per training example instead of every epoch.
    augment: "shift" trains on copies of each image shifted by up to `max_shift` pixels, labelled
        by the teacher: a larger transfer set, which is what lets a cheap student match its teacher
        on small data. Image inputs only; incompatible with cache_teacher (every input is new).
    student: used when distillation runs as a *stage* (recipe, demo, CLI): None distills into a copy
        of the input model; "zoo:NAME" builds that zoo model for the task, scaled by `width` and
        `student_kwargs`. The verb `distill(student, teacher, ...)` takes the student model directly.
    """

    technique: ClassVar[str | None] = "distill"

    temperature: float | Literal["auto"] = "auto"
    alpha: float | Literal["auto"] = "auto"
    tune_grid: list[tuple[float, float]] = Field(
        default_factory=lambda: [(2.0, 0.5), (4.0, 0.5), (4.0, 0.9), (4.0, 1.0), (8.0, 0.9)])
    tune_epochs: int | None = Field(None, ge=1)
    patience: int | Literal["auto"] | None = "auto"
    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int | None = Field(None, gt=0)
    seed: int = 0
    device: str = "auto"
    teacher_device: str | None = None
    features: list[FeatureLink] = Field(default_factory=list)
    cache_teacher: bool = False
    augment: Literal["none", "shift"] = "none"
    max_shift: int = Field(2, ge=1, le=8)
    student: str | None = None
    width: float = Field(1.0, gt=0)
    student_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("student")
    @classmethod
    def _zoo_reference(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("zoo:"):
            raise ValueError(f"student must be 'zoo:NAME' (or None for the input model), got {value!r}")
        return value

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, value):
        if value != "auto" and not value > 0:
            raise ValueError(f"temperature must be > 0 or 'auto', got {value}")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha_in_unit_range(cls, value):
        if value != "auto" and not 0 <= value <= 1:
            raise ValueError(f"alpha must be in [0, 1] or 'auto', got {value}")
        return value

    @field_validator("tune_grid")
    @classmethod
    def _grid(cls, value):
        if not value or any(not (t > 0 and 0 < a <= 1) for t, a in value):
            raise ValueError(f"tune_grid needs (temperature > 0, 0 < alpha <= 1) pairs, got {value}")
        return value

    @field_validator("patience")
    @classmethod
    def _patience(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"patience must be >= 1, 'auto' or None, got {value}")
        return value

    @property
    def tuned(self) -> bool:
        """True when temperature or alpha is chosen on validation."""
        return self.temperature == "auto" or self.alpha == "auto"

    @model_validator(mode="after")
    def _cache_needs_fixed_inputs(self) -> "DistillConfig":
        if self.augment != "none" and self.cache_teacher:
            raise ValueError("cache_teacher needs fixed inputs; with augment the teacher sees new inputs every "
                             "epoch, so set cache_teacher: false")
        return self

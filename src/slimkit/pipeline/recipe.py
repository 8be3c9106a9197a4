"""Recipes: a YAML (or Python) list of stages plus evaluation settings and constraints.

    name: edge
    seed: 0
    evaluation: {runtimes: [torch, ort], threads: 1, batch_sizes: [1, 64]}
    constraints: {max_accuracy_drop: 0.5, max_size_kb: 100, max_latency_ms: 2.0}
    stages:
      - technique: prune
        config: {sparsity: 0.9}
        recovery: {method: distill, epochs: 2}
      - technique: quantize
        config: {weights: int8, activations: int8}

A stage's `config` is validated by the technique's own config class (from the registry), so a
recipe and a Python call build the same objects. Errors name the stage, the key and the line.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from slimkit.core import registry
from slimkit.core.config import Config
from slimkit.core.recovery import RecoveryConfig
from slimkit.errors import ConfigError


class Evaluation(Config):
    # openvino, executorch and litert: each stage's model is also exported to and timed on that runtime
    runtimes: list[Literal["torch", "ort", "openvino", "executorch", "litert"]] = Field(default_factory=lambda: ["torch", "ort"])
    threads: int = Field(1, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    split: Literal["val", "test"] = "test"


class Constraints(Config):
    """Limits the final model must meet; accuracy drop in percentage points vs the original."""

    max_accuracy_drop: float | None = Field(None, ge=0)
    max_size_kb: float | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    latency_runtime: Literal["torch", "ort"] = "ort"
    latency_batch_size: int = Field(1, ge=1)


class Stage(Config):
    technique: str
    name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    recovery: RecoveryConfig | None = None  # after the stage, distilling from the original model

    @field_validator("technique")
    @classmethod
    def _known(cls, value: str) -> str:
        registry.get(value)  # raises ConfigError listing the known techniques
        return value

    def technique_config(self) -> Config:
        return registry.get(self.technique).config_cls.from_dict(self.config)


class Recipe(Config):
    name: str = "recipe"
    seed: int = 0
    stages: list[Stage]
    evaluation: Evaluation = Field(default_factory=Evaluation)
    constraints: Constraints = Field(default_factory=Constraints)

    def stage_configs(self) -> list[Config]:
        return [stage.technique_config() for stage in self.stages]

    def digest(self) -> str:
        """Content hash: a resumed run must be the same recipe."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_stages(cls, configs: list[Config], **kwargs: Any) -> "Recipe":
        """The Python form: a recipe from technique config objects."""
        stages = [Stage(technique=registry.for_config(c).name, config=c.to_dict()) for c in configs]
        return cls(stages=stages, **kwargs)


# -- loading with line numbers ----------------------------------------------------------------
def _line_of(node: yaml.Node | None, path: list[Any]) -> int | None:
    """1-based line of the YAML node at `path` (keys and list indices), or of the deepest parent found."""
    line = None if node is None else node.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _validate_stages(data: dict[str, Any], root: yaml.Node | None, origin: str) -> None:
    """Validate each stage's technique config so errors name stage, key and line."""
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{origin}: a recipe needs a non-empty 'stages' list (line {_line_of(root, ['stages']) or 1})")
    for i, stage in enumerate(stages):
        where = f"{origin}: stage {i + 1}"
        if not isinstance(stage, dict):
            raise ConfigError(f"{where} (line {_line_of(root, ['stages', i])}): expected a mapping with 'technique'")
        label = stage.get("name") or stage.get("technique")
        where = f"{where} ({label})"
        try:
            Stage.from_dict(stage).technique_config()
        except ConfigError as err:
            msg = str(err)
            key = _offending_key(msg)
            # `Stage.recovery.epochs` is the stage's own block; `PruneConfig.recovery.epochs` is in its config
            path = ["stages", i] + (key if msg.startswith("Stage.") else ["config"] + key)
            raise ConfigError(f"{where}, line {_line_of(root, path)}: {msg}") from None


def _offending_key(message: str) -> list[str]:
    """`QuantConfig.weights: ...` -> ['weights']; `Stage.recovery.epochs: ...` -> ['recovery', 'epochs']."""
    head = message.split(":", 1)[0].strip()
    parts = head.split(".")[1:]
    return [p for p in parts if not p.isdigit()]


def load_recipe(source: str | Path | dict[str, Any]) -> Recipe:
    """A Recipe from a YAML/JSON file path, YAML text, or a dict."""
    root = None
    origin = "recipe"
    if isinstance(source, dict):
        data = source
    else:
        text = None
        path = Path(source) if isinstance(source, Path) or "\n" not in str(source) else None
        if path is not None:
            if not path.is_file():
                raise ConfigError(f"recipe file not found: {path}")
            text, origin = path.read_text(), str(path)
        else:
            text = str(source)
        try:
            root = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{origin}: invalid YAML ({err})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: a recipe is a mapping with a 'stages' list")
    _validate_stages(data, root, origin)
    try:
        return Recipe.from_dict(data)
    except ConfigError as err:
        key = _offending_key(str(err))
        raise ConfigError(f"{origin}, line {_line_of(root, key)}: {err}") from None

"""Config base class: typed, defaulted, validated on construction, unknown keys rejected.

Every technique config subclasses `Config`. A recipe file and a Python call build the same
objects, so configs round-trip through dicts, JSON and YAML.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict

from slimkit.errors import ConfigError

C = TypeVar("C", bound="Config")
_DEPTH = threading.local()


def format_validation_error(cls_name: str, err: pydantic.ValidationError) -> str:
    """One readable line per problem: `<Config>.<key>: <what is wrong>`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{cls_name}.{loc}: {msg}")
    return "; ".join(parts)


class Config(BaseModel):
    """Base of all slimkit configs (pydantic, `extra="forbid"`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def __init__(self, **data: Any) -> None:
        # Nested configs are validated inside their parent: only the outermost one converts the
        # pydantic error, so the message keeps the full key path (Parent.child.key).
        _DEPTH.value = getattr(_DEPTH, "value", 0) + 1
        try:
            super().__init__(**data)
        except pydantic.ValidationError as err:
            if _DEPTH.value > 1:
                raise
            raise ConfigError(format_validation_error(type(self).__name__, err)) from None
        finally:
            _DEPTH.value -= 1

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def compact_dict(self, reference: "Config | None" = None) -> dict[str, Any]:
        """The keys whose values differ from `reference` (default: this class's defaults), nested configs
        compacted against the parent's default for them: `type(self).from_dict(c.compact_dict())` rebuilds
        an equal config (a stage's `recovery` is completed from that stage's own defaults)."""
        if reference is None:
            try:
                reference = type(self)()
            except ConfigError:  # a config with required keys: nothing to leave out
                return self.to_dict()
        full = self.to_dict()
        out = {}
        for name in type(self).model_fields:
            value, base = getattr(self, name), getattr(reference, name)
            if value == base:
                continue
            if isinstance(value, Config):
                out[name] = value.compact_dict(base if type(base) is type(value) else None)
            else:
                out[name] = full[name]
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping of keys, got {type(data).__name__}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{cls.__name__}: invalid JSON ({err})") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text: str) -> C:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{cls.__name__}: invalid YAML ({err})") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                return cls.from_json(text)
            return cls.from_yaml(text)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

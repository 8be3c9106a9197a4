"""`slimkit.save` / `slimkit.load`: one safetensors file holding the weights plus a manifest.

The manifest (JSON in the safetensors header metadata under "slimkit") records where the
architecture comes from (zoo name or `package.module:factory` with its keyword arguments) and
every stage applied to the model (technique, config, structure, version). `load` rebuilds the
architecture from the source, replays each stage's `restore`, then loads the weights strictly.
Nothing is unpickled.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import slimkit
from slimkit.core.io import atomic_path
from slimkit.core.state import ATTR, get_state, set_source
from slimkit.errors import ArtifactError, ModelError, SlimkitError

FORMAT = "slimkit-model/1"


def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared tensors stored once (safetensors refuses aliasing) and contiguous."""
    out, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype) \
            if tensor.numel() else None
        if key is not None and key in seen:
            continue  # tied weight: restored by load_state_dict through the module that shares it
        if key is not None:
            seen[key] = name
        out[name] = tensor.detach().cpu().contiguous().clone()
    return out


def save(model: nn.Module, path: str | Path, *, factory: str | None = None,
         factory_kwargs: dict[str, Any] | None = None) -> Path:
    """Write `model` to `path` (safetensors + manifest), atomically.

    A zoo model knows its source. For your own architecture pass `factory="pkg.module:fn"`
    (called with `factory_kwargs` on load). Returns the path written.
    """
    from safetensors.torch import save_file

    state = get_state(model)
    if factory is not None:
        set_source(model, "factory", factory, factory_kwargs)
    if state["source"] is None:
        raise ModelError(
            f"cannot save {type(model).__name__}: slimkit does not know how to rebuild its architecture; "
            "pass factory='package.module:function' (a function returning the model)"
        )
    manifest = {"format": FORMAT, "slimkit_version": slimkit.__version__, "torch_version": torch.__version__,
                "source": state["source"], "stages": state["stages"]}
    tensors = _dedup_state_dict(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"slimkit": json.dumps(manifest)})
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved model, without loading weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"model file not found: {path}")
    if not path.is_file():
        raise ArtifactError(f"model path is not a file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # SafetensorError / OSError on truncated or foreign files
        raise ArtifactError(f"{path} is not a readable safetensors file ({err})") from None
    if "slimkit" not in meta:
        raise ArtifactError(f"{path} is a safetensors file but not a slimkit model (no manifest); "
                            "load it as --weights with a factory instead")
    try:
        manifest = json.loads(meta["slimkit"])
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: corrupt slimkit manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unsupported artifact format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def resolve_factory(ref: str):
    """Import `package.module:function`."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"bad factory reference {ref!r}; use 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"cannot import {module_name!r} for factory {ref!r}: {err}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (factory {ref!r})")
    return fn


def build_source(source: dict[str, Any]) -> nn.Module:
    """Build the original architecture described by a manifest source."""
    kind, ref, kwargs = source.get("kind"), source.get("ref"), source.get("kwargs", {})
    if kind == "zoo":
        from slimkit import zoo

        return zoo.build(ref, **kwargs)
    if kind == "factory":
        model = resolve_factory(ref)(**kwargs)
        if not isinstance(model, nn.Module):
            raise ModelError(f"factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
        return set_source(model, "factory", ref, kwargs)
    raise ArtifactError(f"unknown model source kind {kind!r}")


def rebuild(manifest: dict[str, Any]) -> nn.Module:
    """Architecture (no trained weights) of a manifest: source, then every stage's restore."""
    from slimkit.core import registry
    from slimkit.core.config import Config  # noqa: F401  (configs are rebuilt by their own class)

    model = build_source(manifest["source"])
    for i, stage in enumerate(manifest.get("stages", [])):
        technique = registry.get(stage["technique"])
        config = technique.config_cls.from_dict(stage.get("config", {}))
        if technique.restore is not None:
            model = technique.restore(model, config, stage.get("structure", {}))
        get_state(model)["stages"].append(stage)
    return model


_LOADERS: dict[str, Any] = {}


def register_loader(suffix: str, fn) -> None:
    """Let a technique load its own file format (e.g. ".slim" packed models): fn(path) -> model."""
    _LOADERS[suffix] = fn


def load(path: str | Path, *, map_location: str = "cpu") -> nn.Module:
    """Load a model written by `slimkit.save` (or a registered format such as `.slim`), in eval mode."""
    from slimkit.core import registry

    path = Path(path)
    registry.load_all()  # techniques register their loaders at import
    if path.suffix in _LOADERS:
        if not path.is_file():
            raise ArtifactError(f"model file not found: {path}")
        return _LOADERS[path.suffix](path).eval()
    manifest = read_manifest(path)
    try:
        model = rebuild(manifest)
    except SlimkitError as err:
        raise ArtifactError(f"{path}: cannot rebuild the model: {err}") from None
    tensors = {k: v.to(map_location) for k, v in read_tensors(path).items()}
    load_weights(model, tensors, origin=str(path))
    return model.eval()


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], *, origin: str) -> nn.Module:
    """Load a flat tensor dict into `model` strictly, allowing only tied (deduplicated) keys to be absent."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ArtifactError(f"{origin}: weights do not match the architecture "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ArtifactError(f"{origin}: tensor {k!r} has shape {tuple(v.shape)}, "
                                f"the architecture expects {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            tied.add(name)
        seen.setdefault(key, name)
    return tied


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a plain safetensors file (no manifest needed), with clear errors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:
        raise ArtifactError(f"{path} is not a readable safetensors file ({err})") from None


def load_factory_weights(factory: str, weights: str | Path, factory_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build `factory` and load plain safetensors `weights` (no manifest needed)."""
    tensors = read_tensors(weights)
    model = build_source({"kind": "factory", "ref": factory, "kwargs": factory_kwargs or {}})
    return load_weights(model, tensors, origin=str(weights)).eval()


__all__ = ["save", "load", "register_loader", "read_tensors", "read_manifest", "rebuild", "resolve_factory", "load_factory_weights", "ATTR"]

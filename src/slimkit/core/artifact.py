"""`slimkit.save` / `slimkit.load`: one safetensors file holding the weights plus a manifest.

The manifest (JSON in the safetensors header metadata under "slimkit") records where the
architecture comes from (zoo name or `package.module:factory` with its keyword arguments) and
every stage applied to the model (technique, config, structure, version). `load` rebuilds the
architecture from the source, replays each stage's `restore`, then loads the weights strictly.
Nothing is unpickled.

A model file is data, never code. A manifest naming a factory is only honoured when that factory
is trusted: slimkit's zoo, torchvision / timm models and transformers model types by name
(`slimkit.zoo.external`), builders registered in this process with `register_builder`, or an
explicit `trust_factory=True` (CLI `--trust-factory`) from the user who knows where the file came
from, as Hugging Face's `trust_remote_code`. Anything else raises `UntrustedFactoryError` before
any import. Keyword arguments from a file are passed as JSON data.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import slimkit
from slimkit.core.io import atomic_path
from slimkit.core.state import ATTR, apply_report, get_state, set_source, stages_with_report
from slimkit.errors import ArtifactError, ChainError, ModelError, SlimkitError, UntrustedFactoryError

FORMAT = "slimkit-model/1"


def dedup_state_dict(model: nn.Module, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """State dict with shared tensors stored once (safetensors refuses aliasing) and contiguous. `aliases`,
    when given, receives {dropped key: the stored key it shares memory with}: the rebuilt architecture may
    not tie the same tensors (a traced graph's copy of a tied embedding), so `save` records them."""
    out, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype) \
            if tensor.numel() else None
        if key is not None and key in seen:
            if aliases is not None:
                aliases[name] = seen[key]
            continue  # tied weight: restored by load_state_dict through the module that shares it
        if key is not None:
            seen[key] = name
        out[name] = tensor.detach().cpu().contiguous().clone()
    return out


def save(model: nn.Module, path: str | Path, *, factory: str | Callable[..., nn.Module] | None = None,
         factory_kwargs: dict[str, Any] | None = None) -> Path:
    """Write `model` to `path` (safetensors + manifest), atomically.

    A zoo model knows its source. For your own architecture pass `factory=build_net` (a function
    returning the model; it is registered as a trusted builder) or `factory="pkg.module:fn"`;
    `load` calls it with `factory_kwargs` (JSON data) once it is trusted in the loading process
    (`register_builder`, or `load(..., trust_factory=True)`). Returns the path written.
    """
    from safetensors.torch import save_file

    state = get_state(model)
    if callable(factory):
        factory = register_builder(factory)
    if factory is not None:
        _check_kwargs(factory, factory_kwargs or {})
        set_source(model, "factory", factory, factory_kwargs)
    if state["source"] is None:
        raise ModelError(
            f"cannot save {type(model).__name__}: slimkit does not know how to rebuild its architecture; "
            "pass factory='package.module:function' (a function returning the model)"
        )
    manifest = {"format": FORMAT, "slimkit_version": slimkit.__version__, "torch_version": torch.__version__,
                "source": state["source"], "stages": stages_with_report(model)}
    aliases: dict[str, str] = {}
    tensors = dedup_state_dict(model, aliases)
    if aliases:
        manifest["aliases"] = aliases
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


# Builders `load` may call without asking: ref ("pkg.module:fn") -> function. slimkit's own
# factories (NAS architectures) register here at import; users add theirs with `register_builder`.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def builder_ref(fn: Callable[..., Any]) -> str:
    """The `package.module:function` reference of a function."""
    return f"{fn.__module__}:{fn.__qualname__}"


def register_builder(fn: Callable[..., nn.Module], name: str | None = None) -> str:
    """Trust `fn` to rebuild architectures on load in this process; returns its reference.

    `name` defaults to `"package.module:function"`, which is what `save(factory=...)` records.
    Usable as `sk.register_builder(build_net)` before `sk.load(path)`.
    """
    if not callable(fn):
        raise ModelError(f"register_builder needs a function returning a torch.nn.Module, got {type(fn).__name__}")
    ref = name or builder_ref(fn)
    _parse_ref(ref)
    _BUILDERS[ref] = fn
    return ref


def trusted_builders() -> list[str]:
    """References `load` calls without `trust_factory` (zoo models are always trusted)."""
    return sorted(_BUILDERS)


def _parse_ref(ref: Any) -> tuple[str, str]:
    module_name, sep, attr = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    if not sep or not module_name or not attr:
        raise ModelError(f"bad factory reference {ref!r}; use 'package.module:function'")
    return module_name, attr


def resolve_factory(ref: str) -> Callable[..., Any]:
    """Import `package.module:function`: this IMPORTS AND RUNS user code, so only call it for a
    reference the user typed or explicitly trusted (see `build_source`)."""
    module_name, attr = _parse_ref(ref)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"cannot import {module_name!r} for factory {ref!r}: {err}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (factory {ref!r})")
    if not callable(fn):
        raise ModelError(f"factory {ref!r} is a {type(fn).__name__}, not a function returning a torch.nn.Module")
    return fn


def _check_kwargs(ref: str, kwargs: Any) -> None:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ArtifactError(f"factory {ref!r}: keyword arguments must be a JSON object, got {type(kwargs).__name__}")


def _call_builder(ref: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = fn(**kwargs)
    except TypeError as err:  # wrong keyword arguments for this builder
        raise ModelError(f"factory {ref!r} cannot be called with {sorted(kwargs)}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_source(source: dict[str, Any], *, trust_factory: bool = False) -> nn.Module:
    """Build the original architecture described by a manifest source.

    A factory is called only when it is registered (`register_builder`) or `trust_factory` is
    set; otherwise `UntrustedFactoryError` is raised and nothing is imported.
    """
    if not isinstance(source, dict):
        raise ArtifactError(f"model source must be a JSON object, got {type(source).__name__}")
    kind, ref, kwargs = source.get("kind"), source.get("ref"), source.get("kwargs", {})
    if kind == "zoo":
        from slimkit import zoo

        _check_kwargs(f"zoo:{ref}", kwargs)
        return zoo.build(ref, **kwargs)
    from slimkit.zoo.external import KINDS, build_external, build_hf

    if kind in KINDS:  # looked up in the library's own model registry (zoo/external.py)
        if not isinstance(ref, str):
            raise ArtifactError(f"model source {kind!r}: the model name must be a string, got {type(ref).__name__}")
        _check_kwargs(f"{kind}:{ref}", kwargs)
        if kind == "hf":  # a file names a model type, never a directory to read
            return build_hf(ref, allow_dir=False, **kwargs)
        return build_external(kind, ref, **kwargs)
    if kind == "factory":
        _parse_ref(ref)
        _check_kwargs(ref, kwargs)
        if ref in _BUILDERS:
            fn = _BUILDERS[ref]
        elif trust_factory:
            fn = resolve_factory(ref)
        else:
            raise UntrustedFactoryError(
                f"the file names the builder {ref!r}, which is not trusted: loading would import and run it. "
                "If you trust the file's origin, pass trust_factory=True to slimkit.load (CLI: --trust-factory), "
                "or register the builder first with slimkit.register_builder(fn)")
        return set_source(_call_builder(ref, fn, kwargs), "factory", ref, kwargs)
    raise ArtifactError(f"unknown model source kind {kind!r}")


def rebuild(manifest: dict[str, Any], *, trust_factory: bool = False) -> nn.Module:
    """Architecture (no trained weights) of a manifest: source, then every stage's restore."""
    from slimkit.core import registry

    model = build_source(manifest["source"], trust_factory=trust_factory)
    for i, stage in enumerate(manifest.get("stages", [])):
        technique = registry.get(stage["technique"])
        try:
            registry.check_chain([s["technique"] for s in manifest["stages"][:i]], technique.name)
        except ChainError as err:
            raise ArtifactError(f"the file records stages no slimkit run produces: {err}") from None
        config = technique.config_cls.from_dict(stage.get("config", {}))
        if technique.restore is not None:
            model = technique.restore(model, config, stage.get("structure", {}))
        get_state(model)["stages"].append({k: v for k, v in stage.items() if k != "report"})
    return apply_report(model, manifest.get("stages", []))


_LOADERS: dict[str, Any] = {}


def register_loader(suffix: str, fn) -> None:
    """Let a technique load its own file format (e.g. ".slim" packed models):
    fn(path, *, trust_factory: bool) -> model, rebuilding through `rebuild`."""
    _LOADERS[suffix] = fn


def load(path: str | Path, *, map_location: str = "cpu", trust_factory: bool = False) -> nn.Module:
    """Load a model written by `slimkit.save` (or a registered format such as `.slim`), in eval mode.

    `trust_factory=True` lets the file's manifest import and call a builder that is not registered
    in this process (see the module docstring): only for files whose origin you trust.
    """
    from slimkit.core import registry

    path = Path(path)
    registry.load_all()  # techniques register their loaders and builders at import
    if path.suffix in _LOADERS:
        if not path.is_file():
            raise ArtifactError(f"model file not found: {path}")
        return _LOADERS[path.suffix](path, trust_factory=trust_factory).eval()
    manifest = read_manifest(path)
    try:
        model = rebuild(manifest, trust_factory=trust_factory)
    except UntrustedFactoryError as err:
        raise UntrustedFactoryError(f"{path}: {err}") from None
    except SlimkitError as err:
        raise ArtifactError(f"{path}: cannot rebuild the model: {err}") from None
    tensors = {k: v.to(map_location) for k, v in read_tensors(path).items()}
    aliases = manifest.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ArtifactError(f"{path}: the manifest's aliases are not a mapping of tensor names")
    expected = model.state_dict()
    for name, stored in aliases.items():  # tensors the saved model shared; the rebuilt one may not
        if name in expected and name not in tensors and stored in tensors:
            tensors[name] = tensors[stored]
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
    import collections

    # modules' versioned loaders (e.g. an observer's eps, a buffer since its version 2) see the rebuilt model's
    # own versions: the tensors come from a state dict of this architecture, not of an older release
    state = collections.OrderedDict(tensors)
    state._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=False)
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
    """Build `factory` (a reference the caller chose: it is imported and called, and trusted for the
    rest of this process, e.g. to reload checkpoints made from it) and load plain safetensors
    `weights` (no manifest needed)."""
    tensors = read_tensors(weights)
    register_builder(resolve_factory(factory), name=factory)
    model = build_source({"kind": "factory", "ref": factory, "kwargs": factory_kwargs or {}})
    return load_weights(model, tensors, origin=str(weights)).eval()


__all__ = ["save", "load", "register_loader", "register_builder", "trusted_builders", "read_tensors", "read_manifest",
           "rebuild", "resolve_factory", "load_factory_weights", "ATTR"]

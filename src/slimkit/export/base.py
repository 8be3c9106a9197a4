"""Export dispatch by file suffix. A technique whose models need special lowering (e.g.
quantized models to ONNX QDQ) registers an exporter with a predicate; the most recently
registered matching exporter wins, the plain one is the fallback."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from slimkit.errors import ConfigError

_EXPORTERS: list[tuple[str, Callable[[nn.Module], bool], Callable[..., Path]]] = []


def register_exporter(suffix: str, fn: Callable[..., Path], predicate: Callable[[nn.Module], bool] | None = None) -> None:
    """fn(model, path, example_input=None, **kw) -> path, used for `suffix` when predicate(model)."""
    _EXPORTERS.append((suffix, predicate or (lambda m: True), fn))


def export(model: nn.Module, path: str | Path, *, example_input: Any = None, **kwargs: Any) -> Path:
    """Write `model` in the format its suffix names (.onnx, .safetensors, or a registered one)."""
    from slimkit.core import registry

    registry.load_all()  # techniques register their exporters at import
    path = Path(path)
    for suffix, predicate, fn in reversed(_EXPORTERS):
        if path.suffix == suffix and predicate(model):
            return fn(model, path, example_input=example_input, **kwargs)
    known = sorted({s for s, _, _ in _EXPORTERS})
    raise ConfigError(f"cannot export to {path.name!r}: unknown format {path.suffix!r}; known: {', '.join(known)}")


def _save_safetensors(model: nn.Module, path: Path, example_input: Any = None, **kwargs: Any) -> Path:
    from slimkit.core.artifact import save

    return save(model, path, **kwargs)


def _export_onnx(model: nn.Module, path: Path, example_input: Any = None, **kwargs: Any) -> Path:
    from slimkit.export.onnx import export_onnx

    if example_input is None:
        raise ConfigError("ONNX export needs example_input (e.g. task.example_input(1))")
    return export_onnx(model, path, example_input, **kwargs)


def _needs_example(fmt: str):
    def wrap(fn):
        def export_fn(model: nn.Module, path: Path, example_input: Any = None, **kwargs: Any) -> Path:
            if example_input is None:
                raise ConfigError(f"{fmt} export needs example_input (e.g. task.example_input(1))")
            return fn(model, path, example_input, **kwargs)
        return export_fn
    return wrap


def _export_executorch(model, path, example_input, **kw):
    from slimkit.export.executorch import export_executorch

    return export_executorch(model, path, example_input, **kw)


def _export_litert(model, path, example_input, **kw):
    from slimkit.export.litert import export_litert

    return export_litert(model, path, example_input, **kw)


def _export_openvino(model, path, example_input, **kw):
    from slimkit.export.openvino import export_openvino

    return export_openvino(model, path, example_input, **kw)


register_exporter(".safetensors", _save_safetensors)
register_exporter(".onnx", _export_onnx)
register_exporter(".pte", _needs_example("ExecuTorch")(_export_executorch))
register_exporter(".tflite", _needs_example("LiteRT")(_export_litert))
register_exporter(".xml", _needs_example("OpenVINO")(_export_openvino))

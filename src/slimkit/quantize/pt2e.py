"""PyTorch-native int8 through torchao's PT2E flow and its x86 (oneDNN) quantizer.

The alternative to slimkit's ONNX QDQ export for users who deploy with PyTorch itself:

    q = slimkit.quantize_pt2e(model, task=task)   # export, annotate, calibrate, convert, lower
    q(x)                                          # onednn.qconv_pointwise / qlinear int8 kernels
    slimkit.save(q, "model.safetensors"); slimkit.load("model.safetensors")

What happens: `torch.export` captures the model; torchao's `X86InductorQuantizer` annotates it
(int8 symmetric per-channel weights, uint8 per-tensor activations with a histogram observer — that
quantizer's own choices, not slimkit's calibrators); calibration batches run through the observers;
`convert_pt2e` inserts quantize/dequantize pairs and the x86 lowering passes (inductor's freezing
patterns, no C++ compilation) fuse each `dq -> conv/linear -> q` into one oneDNN int8 op. The
result runs real int8 kernels in plain PyTorch, on CPU.

The lowered graph is specialized to an input shape; `Pt2eInt8Model` lowers once per new shape and
caches it (a few seconds each). Saving stores the float weights and the observers' statistics in
safetensors (never a pickle): loading re-captures the model and lowers it again, so a file loads
only with the same PyTorch/torchao versions' graph capture (checked on load: a mismatch is a
ModelError).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, ClassVar

import torch
import torch.nn as nn
from pydantic import Field

from slimkit.core import registry
from slimkit.core.config import Config
from slimkit.core.registry import Technique, chained
from slimkit.core.state import ATTR, copy_model, get_state, record_stage
from slimkit.errors import CalibrationError, MissingDependencyError, ModelError


class Pt2eConfig(Config):
    """Static int8 through torchao PT2E + the x86 quantizer.

    calibration_samples: how many calibration inputs run through the observers.
    batch_size: the batch shape the model is captured and first lowered with (other shapes are
        lowered on first use).
    """

    technique: ClassVar[str] = "quantize_pt2e"

    calibration_samples: int = Field(512, ge=1)
    batch_size: int = Field(64, ge=1)


def _torchao():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as err:  # pragma: no cover - torchao is pinned
        raise MissingDependencyError(f"the PT2E path needs torchao: {err}") from None
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    return prepare_pt2e, convert_pt2e, quantizer


def _split_repeated_calls(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """A module called more than once (torchvision's Bottleneck calls one `self.relu` three times) leaves its
    calls under one module path, and the quantizer's pattern matcher (`get_source_partitions`, which groups
    nodes by that path) then sees one "partition" with several outputs and gives up. Each call is a connected
    group of nodes: record each as a source of its own (`source_fn_stack`, which the matcher reads first)."""
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or node.meta.get("source_fn_stack") or not stack:
            continue
        fqn = list(stack.values())[-1][0]
        groups.setdefault(fqn, []).append(node)
    for fqn, nodes in groups.items():
        parent = {n: n for n in nodes}

        def root(n):
            while parent[n] is not n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for n in nodes:
            for inp in n.all_input_nodes:
                if inp in parent:
                    parent[root(n)] = root(inp)
        calls: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for n in nodes:
            calls.setdefault(root(n), []).append(n)
        if len(calls) < 2:
            continue
        try:
            cls = type(model.get_submodule(fqn))
        except AttributeError:
            continue
        for i, call in enumerate(calls.values()):
            for n in call:
                n.meta["source_fn_stack"] = [(f"{fqn}__call{i}", cls)]


def _capture(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """The model with torchao's observers inserted (not yet calibrated)."""
    prepare_pt2e, _, quantizer = _torchao()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model.eval(), (example,),
                                           dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        _split_repeated_calls(exported, model)
    except Exception as err:
        raise ModelError(f"torch.export cannot capture {type(model).__name__} for PT2E quantization: "
                         f"{str(err).splitlines()[0]}") from None
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    # slimkit's evaluation calls .eval() on every model: let the captured graph accept it
    return allow_exported_model_train_eval(prepare_pt2e(exported, quantizer))


def _lower(prepared: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """Convert a calibrated prepared model and fuse it into oneDNN int8 ops for `example`'s shape."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    _, convert_pt2e, _ = _torchao()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_pt2e(copy.deepcopy(prepared))
        lowered = lower_pt2e_quantized_to_x86(converted, (example,))
    # oneDNN int8 convolutions return channels-last tensors, which `view` (e.g. a Flatten) cannot
    # reinterpret: `reshape` is the same op where possible and copies where needed
    for node in lowered.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    lowered.recompile()
    return lowered


class Pt2eInt8Model(nn.Module):
    """A PT2E-quantized model: `prepared` holds the float weights and calibrated observers (what is
    saved); forward runs the lowered int8 graph for the input's shape (lowered on first use)."""

    def __init__(self, prepared: torch.fx.GraphModule, example_shape: tuple[int, ...],
                 example_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.prepared = prepared
        self.example_shape = tuple(example_shape)
        self.example_dtype = example_dtype  # token ids (int64) for language models
        object.__setattr__(self, "_lowered", {})  # (shape, dtype) -> lowered graph (not state: rebuilt on load)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._lowered.clear())

    def lowered(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.fx.GraphModule:
        key = (tuple(shape), dtype or self.example_dtype)
        if key not in self._lowered:
            self._lowered[key] = _lower(self.prepared, torch.zeros(key[0], dtype=key[1]))
        return self._lowered[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ModelError("the PT2E x86 int8 model runs on CPU only (oneDNN kernels); move the input to CPU")
        with torch.no_grad():
            return self.lowered(tuple(x.shape), x.dtype)(x)

    def kernels(self) -> dict[str, int]:
        """Op counts of the lowered graph for the example shape (shows which layers run in int8)."""
        counts: dict[str, int] = {}
        for node in self.lowered(self.example_shape).graph.nodes:
            if node.op == "call_function":
                name = str(node.target)
                counts[name] = counts.get(name, 0) + 1
        return counts


def _observer_shapes(prepared: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in prepared.state_dict().items() if k.startswith("activation_post_process_")}


@chained("quantize_pt2e")
def quantize_pt2e(model: nn.Module, config: Pt2eConfig | None = None, *, task=None, calibration_data=None,
                  **kwargs: Any) -> Pt2eInt8Model:
    """Static int8 of `model` with torchao's PT2E flow and x86 quantizer; returns a new model that
    runs oneDNN int8 kernels on CPU (the input is untouched). Calibration data: the task's
    calibration split, or `calibration_data` (a tensor or list of batches)."""
    from slimkit.quantize.ptq import check_batch, batches_from

    if config is None:
        config = Pt2eConfig(**kwargs)
    elif kwargs:
        config = Pt2eConfig(**{**config.to_dict(), **kwargs})
    data = calibration_data if calibration_data is not None else task
    if data is None:
        raise CalibrationError("PT2E quantization needs calibration data: pass task=... or calibration_data=...")
    batches = batches_from(data, batch_size=config.batch_size, max_samples=config.calibration_samples)
    if not batches or not any(len(b) for b in batches):
        raise CalibrationError("the calibration set is empty: give at least one sample")
    for i, b in enumerate(batches):
        check_batch(b, i)
    src = copy_model(model).eval().cpu()
    example = batches[0][:1].expand(config.batch_size, *batches[0].shape[1:]).contiguous()
    prepared = _capture(src, example)
    with torch.no_grad():
        for b in batches:
            prepared(b)
    # eval mode now, as `restore` does: switching rewrites the graph (a tied embedding keeps one name), so the
    # saved and the rebuilt state dicts have the same keys whether or not the user calls .eval() before saving
    prepared.eval()  # (the exported graph's eval returns None)
    out = Pt2eInt8Model(prepared, tuple(example.shape), example.dtype)
    object.__setattr__(out, ATTR, copy.deepcopy(get_state(src)))
    record_stage(out, "quantize_pt2e", config, {"example_shape": list(example.shape),
                                                 "example_dtype": str(example.dtype).replace("torch.", ""),
                                                 "observer_shapes": _observer_shapes(prepared),
                                                 "torch_version": torch.__version__})
    return out


def restore(model: nn.Module, config: Pt2eConfig, structure: dict[str, Any]) -> Pt2eInt8Model:
    """Re-capture the float architecture with empty observers shaped like the saved ones."""
    shape = tuple(structure["example_shape"])
    dtype = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}.get(
        structure.get("example_dtype", "float32"))
    if dtype is None:
        raise ModelError(f"the PT2E stage records an unknown input dtype {structure.get('example_dtype')!r}")
    prepared = _capture(model, torch.zeros(shape, dtype=dtype))
    prepared.eval()
    saved = structure.get("observer_shapes", {})
    have = _observer_shapes(prepared)
    if set(saved) != set(have):
        raise ModelError(f"the PT2E graph captured now has different observers than the saved one "
                         f"(saved with torch {structure.get('torch_version')}, this is {torch.__version__})")
    for key, dims in saved.items():
        if have[key] == dims:  # (e.g. an observer's eps: the quantizer's value, which loading does not set)
            continue
        owner, name = key.rsplit(".", 1)
        module = prepared.get_submodule(owner)
        setattr(module, name, torch.empty(dims, dtype=getattr(module, name).dtype))
    out = Pt2eInt8Model(prepared, shape, dtype)
    object.__setattr__(out, ATTR, copy.deepcopy(get_state(model)))
    return out


registry.register(Technique(
    name="quantize_pt2e", family="quantization", config_cls=Pt2eConfig, apply=quantize_pt2e,
    summary="static int8 in PyTorch itself: torchao PT2E + x86 quantizer, lowered to oneDNN int8 kernels (CPU)",
    restore=restore, runtime="torch", order=81, next=()))

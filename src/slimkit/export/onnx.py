"""fp32 ONNX export with a dynamic batch axis, written atomically as one self-contained file.

Uses the TorchScript-based exporter (`dynamo=False`): it is ~20x faster to run than the dynamo
exporter on small models and its graphs are what ONNX Runtime's quantization tools expect
(the exporter the team chose). Pass `dynamo=True` for models the old exporter cannot trace.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slimkit.core.io import atomic_path
from slimkit.errors import UnsupportedLayerError


def input_names_for(example: Any) -> list[str]:
    if isinstance(example, (tuple, list)):
        return ["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
    return ["input"]


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Hugging Face transformers models run attention through `scaled_dot_product_attention`, which the
    TorchScript exporter cannot convert with grouped-query attention (Llama-style `num_key_value_heads`);
    their "eager" implementation computes the same function with matmul and softmax. Switched for the
    export only, then restored."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation", "eager") not in (None, "eager")}
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


def export_onnx(model: nn.Module, path: str | Path, example_input: Any, *, opset: int = 17,
                dynamic_batch: bool = True, dynamo: bool = False, input_names: list[str] | None = None) -> Path:
    """Export `model` (eval mode, CPU) to ONNX at `path`; returns the path."""
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    names = input_names or input_names_for(args)
    model = model.eval().cpu()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings(), eager_attention(model):
        warnings.simplefilter("ignore")
        try:
            if dynamo:
                dims = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
                torch.onnx.export(model, args, str(tmp), dynamo=True, external_data=False, input_names=names,
                                  output_names=["output"], dynamic_shapes=dims, opset_version=max(opset, 18))
            else:
                axes = {n: {0: "batch"} for n in names + ["output"]} if dynamic_batch else None
                torch.onnx.export(model, args, str(tmp), dynamo=False, input_names=names, output_names=["output"],
                                  dynamic_axes=axes, opset_version=opset)
                tidy_graph(tmp)
        except Exception as err:
            raise UnsupportedLayerError(f"ONNX export of {type(model).__name__} failed: {err}") from None
    return path


def tidy_graph(path: str | Path) -> dict[str, int]:
    """Rewrite the TorchScript exporter's file in place, keeping what it computes; returns what changed.

    - Constant nodes of the main graph become initializers: the exporter writes buffers it folds (e.g. a
      quantized model's integer codes) as Constant nodes; as initializers they are what ONNX tools expect
      of weights (external data, sharing), and the file is smaller (one name per tensor instead of a node
      with its name and attribute).
    - One DynamicQuantizeLinear per tensor: each dynamic int8 layer quantizes its own input, so the
      query/key/value projections of an attention block quantize the same tensor three times. ONNX
      Runtime merges them when it optimizes the graph; merged in the file, it is smaller (and so is the
      work of runtimes that do not)."""
    import onnx

    model = onnx.load(str(path))
    graph, kept, rename = model.graph, [], {}
    changed = {"constants_moved": 0, "input_quantizations_shared": 0}
    first: dict[str, onnx.NodeProto] = {}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value" and not node.domain:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            changed["constants_moved"] += 1
            continue
        if node.op_type == "DynamicQuantizeLinear" and not node.domain and not outputs & set(node.output):
            same = first.setdefault(node.input[0], node)
            if same is not node:
                rename.update(zip(node.output, same.output))
                changed["input_quantizations_shared"] += 1
                continue
        kept.append(node)
    if any(changed.values()):
        del graph.node[:]
        graph.node.extend(kept)
        onnx.save(model, str(path))
    return changed


def run_onnx(path: str | Path, example_input: Any, threads: int = 1) -> np.ndarray:
    from slimkit.evaluate.latency import ort_inputs, ort_session

    session = ort_session(path, threads)
    return session.run(None, ort_inputs(session, tuple(example_input) if isinstance(example_input, list) else example_input))[0]


def check_onnx_parity(model: nn.Module, path: str | Path, example_input: Any) -> dict[str, float]:
    """Max and mean absolute difference between PyTorch and ONNX Runtime outputs, and top-1 agreement."""
    from slimkit.export.runtimes import check_parity

    result = check_parity(model, path, example_input)
    result.pop("output_std")
    return result

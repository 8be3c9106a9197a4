"""`torch.export` capture shared by the mobile exporters (ExecuTorch, LiteRT).

A float model is captured as it is. A slimkit-quantized model is captured with its integer weight codes,
its calibrated activation scales / zero points and int32-exact biases written as PyTorch's
`quantized_decomposed` Q/DQ ops (`quantize.modules.pt2_export_mode`): the same graph PT2E's
`convert_pt2e` hands the runtimes, so their own lowerings put it on int8 kernels, but with slimkit's
numbers (GPTQ/AdaRound roundings, bias correction, calibrated ranges) instead of a re-quantization.

slimkit quantizes a tensor once, where a quantized layer reads or writes it; value-preserving ops between
(max-pool, flatten, reshape, ...) pass the codes through. The runtimes match only `dq -> op -> q` patterns,
so `propagate_qdq` repeats the producer's Q/DQ after each such op: a numerical no-op (those ops commute
with the affine map) that keeps them on integer kernels.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn as nn

from slimkit.errors import UnsupportedLayerError

# aten ops that move or select values without changing them: dq -> op equals op -> dq
_PASS_THROUGH = {"max_pool2d", "max_pool2d_with_indices", "max_pool1d", "adaptive_max_pool2d", "flatten", "view",
                 "reshape", "_unsafe_view", "permute", "transpose", "squeeze", "unsqueeze", "dropout", "clone",
                 "contiguous", "alias", "slice", "select", "expand", "pad", "constant_pad_nd"}


def _args(example: Any) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def capture(model: nn.Module, example_input: Any, *, folded: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` of `model` (eval, CPU) for `example_input`'s static shape. Quantized models are captured
    with slimkit's own integer parameters (module docstring): as int8 constants (`folded`, ExecuTorch) or as
    their float values quantized in the graph (LiteRT)."""
    args = _args(example_input)
    model = model.eval().cpu()
    ep = _export(model, args, set(), folded)
    float_out = _float_output_layers(ep, model) if folded else set()
    if float_out:  # once more, with those layers marked (QuantWeightLayer.freeze_for_pt2)
        ep = _export(model, args, float_out, folded)
    propagate_qdq(ep.graph_module)
    duplicate_dq(ep.graph_module)
    return ep


def _export(model: nn.Module, args: tuple, float_out: set[str], folded: bool) -> torch.export.ExportedProgram:
    with _quantized_export(model, float_out, folded), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model, args, strict=False)
        except Exception as err:
            raise UnsupportedLayerError(f"torch.export of {type(model).__name__} failed: {str(err).splitlines()[0]}") from None


_WEIGHTED = {"conv1d", "conv2d", "convolution", "linear"}
_ACTIVATIONS = {"relu", "relu_", "hardtanh", "hardtanh_", "clamp", "relu6"}


def _float_output_layers(ep: torch.export.ExportedProgram, model: nn.Module) -> set[str]:
    """Quantized layers whose output is not quantized again (e.g. the classifier's logits). XNNPACK has no
    int8 kernel that returns float, and ExecuTorch 1.5.1 mis-runs such a layer when it delegates it (raw
    codes used as weights): see `QuantWeightLayer.freeze_for_pt2(float_output=True)`."""
    from slimkit.quantize.graph import weight_layers

    names = set(weight_layers(model))
    dq_ops = (torch.ops.quantized_decomposed.dequantize_per_channel.default,
              torch.ops.quantized_decomposed.dequantize_per_tensor.default)
    q_op = torch.ops.quantized_decomposed.quantize_per_tensor.default
    found = set()
    for node in ep.graph.nodes:
        if node.op != "call_function" or _op_name(node) not in _WEIGHTED or len(node.args) < 2:
            continue
        w = node.args[1]
        if not (isinstance(w, torch.fx.Node) and w.target in dq_ops):
            continue
        out = node
        while len(out.users) == 1 and _op_name(next(iter(out.users))) in _ACTIVATIONS:
            out = next(iter(out.users))
        if any(u.target is q_op for u in out.users):
            continue
        paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        owner = next((_clean(p) for p in reversed(paths) if _clean(p) in names), None)
        if owner is not None:
            found.add(owner)
    return found


def _op_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", "").split(".")[0] if node.op == "call_function" else ""


def _clean(path: str) -> str:
    """A module path as `nn_module_stack` writes it ("L['self'].features.0", "features.0") -> "features.0"."""
    import re

    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")


@contextlib.contextmanager
def _quantized_export(model: nn.Module, float_out: set[str], folded: bool):
    """Freeze a quantized model's integer parameters and switch its modules to Q/DQ ops (no-op for float)."""
    from slimkit.quantize.embedding import QuantEmbedding
    from slimkit.quantize.graph import act_quantizers, weight_layers
    from slimkit.quantize.modules import deployable, pt2_export_mode, pt2_grid

    layers = [m for m in weight_layers(model).values() if m.enabled]
    if not layers and not act_quantizers(model):
        yield
        return
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding) or getattr(m, "dynamic", False) or (m in layers and not deployable(m.spec)):
            what = "quantized embedding table" if isinstance(m, QuantEmbedding) else \
                "dynamically quantized layer" if getattr(m, "dynamic", False) else f"{m.spec.bits}-bit {m.spec.granularity} weights"
            raise UnsupportedLayerError(f"layer {name!r}: a {what} has no int8 kernel in ExecuTorch/LiteRT here; "
                                        "export this model to ONNX (.onnx) instead")
    for name, m in weight_layers(model).items():
        if m.enabled:
            m.freeze_for_pt2(folded=folded, float_output=name in float_out)  # 8-bit only: a clear error before tracing
    for q in act_quantizers(model):
        q.pt2_qparams = (float(q.scale.detach().abs()), int(q.zero_point))
        pt2_grid(q.spec, q.pt2_qparams[1])
    stash = _stash_unused(layers, act_quantizers(model))
    try:
        with pt2_export_mode():
            yield
    finally:
        for table, name, value in stash:
            table[name] = value
        for m in layers:
            m.unfreeze()


def _stash_unused(layers: list[nn.Module], quantizers: list[nn.Module]) -> list[tuple[dict, str, Any]]:
    """Take out the tensors the Q/DQ graph does not read (float weights, scale/zero-point buffers: the
    frozen copies stand in for them), so the program carries no dead constants (LiteRT's converter also
    rejects unsigned integer constants). Returns what to put back."""
    taken = []
    for m, names in [(m, ("weight_scale", "weight_zero_point")) for m in layers] + \
                    [(m.layer, ("weight", "bias")) for m in layers] + [(q, ("scale", "zero_point")) for q in quantizers]:
        for table in (m._parameters, m._buffers):
            for name in names:
                if name in table:
                    taken.append((table, name, table.pop(name)))
    return taken


def duplicate_dq(gm: torch.fx.GraphModule) -> int:
    """Give every consumer of a dequantized tensor its own dequantize node (as PT2E's convert does): a
    shared one ties the consumers' partitions together and XNNPACK's partitioner then finds cycles
    (a residual block's input feeds both its conv and its add). Returns how many copies were made."""
    dq_op = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    made = 0
    for node in list(gm.graph.nodes):
        if node.target is not dq_op or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with gm.graph.inserting_after(node):
                copy = gm.graph.call_function(dq_op, node.args, dict(node.kwargs))
            copy.meta.update(node.meta)
            user.replace_input_with(node, copy)
            made += 1
    if made:
        gm.graph.lint()
        gm.recompile()
    return made


def propagate_qdq(gm: torch.fx.GraphModule) -> int:
    """After every value-preserving op whose input comes out of a per-tensor dequantize and whose output is
    not quantized already, insert the same quantize/dequantize pair; returns how many were inserted."""
    q_op = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dq_op = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    inserted = 0
    for node in list(gm.graph.nodes):
        if _op_name(node) not in _PASS_THROUGH:
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.target is not dq_op:
            continue
        if "max_pool2d_with_indices" in node.target.__name__ or any(u.target is q_op for u in node.users):
            continue
        qparams = src.args[1:]
        with gm.graph.inserting_after(node):
            q = gm.graph.call_function(q_op, (node, *qparams))
        with gm.graph.inserting_after(q):
            dq = gm.graph.call_function(dq_op, (q, *qparams))
        node.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not q)
        for new, val in ((q, torch.int8), (dq, torch.float32)):
            if "val" in node.meta:
                new.meta["val"] = node.meta["val"].to(val)
        inserted += 1
    if inserted:
        gm.graph.lint()
        gm.recompile()
    return inserted

"""Structural preparation of a model for quantization (no data involved).

1. Trace the model with torch.fx (Conv/Linear layers, including subclasses, are leaves).
2. Fold every BatchNorm that directly follows a convolution into it.
3. Wrap the selected Conv/Linear layers in `QuantConv` / `QuantLinear`.
4. Static activations: place one `ActQuant` per *tensor* that enters or leaves a quantized layer.
   The output quantizer goes after the layer's activation (ReLU/ReLU6) so ONNX Runtime can drop the
   activation into the integer kernel; an input is traced back through value-preserving ops
   (max-pool, flatten, reshape, dropout) so the quantizer sits on the tensor those ops propagate.

Models fx cannot trace (e.g. Hugging Face transformers) fall back to wrapping layers in place;
static activations are then quantized at each layer's input, and at each convolution's output too (ONNX
Runtime fuses a convolution into its int8 kernel only between quantize nodes), noted in the result.
The same function rebuilds the architecture on load (`restore`), so it must stay deterministic.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.selector import Selector, select, set_submodule
from slimkit.quantize import numerics as nq
from slimkit.quantize.embedding import QuantEmbedding
from slimkit.quantize.modules import ActQuant, QuantConv, QuantLinear, QuantWeightLayer

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)
_PASS_FUNCS = {torch.flatten, torch.reshape, F.dropout, F.max_pool2d, torch.squeeze, torch.unsqueeze}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze", "size"}
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_ACT_FUNCS = {F.relu, torch.relu, F.relu6, F.hardtanh}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # batch norms are leaves even when a library subclasses them (timm's BatchNormAct2d: BN + drop + act),
        # so `fold_batchnorm` sees them after their convolution
        return isinstance(m, QUANTIZABLE + (ActQuant, QuantWeightLayer, QuantEmbedding, nn.modules.batchnorm._BatchNorm)) \
            or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """fx GraphModule of `model` in eval mode, or None when it cannot be traced symbolically. (fx bakes
    `self.training` into functional calls such as `F.dropout(training=...)`: a model rebuilt for loading is
    in training mode, and tracing it so would give a file that reloads with dropout on.)"""
    model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow, unsupported builtins, ...
        return None
    return fx.GraphModule(model, graph, type(model).__name__)


def _module(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def _after_norm(bn: nn.Module) -> nn.Module | None | bool:
    """What a batch norm computes after normalizing: None for a plain one; for a subclass that adds an
    activation (timm's BatchNormAct: `drop` then `act`), that activation (eval mode: dropout is the identity);
    False for a subclass whose forward does something else (left unfolded)."""
    if type(bn).forward in (nn.BatchNorm1d.forward, nn.BatchNorm2d.forward):
        return None
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if isinstance(act, nn.Module) and isinstance(drop, (nn.Identity, nn.Dropout, type(None))):
        return act
    return False


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold BatchNorm into the preceding Conv (its sole consumer); returns the folded BN names."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    folded = []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.track_running_stats:
            continue
        prev = node.args[0]
        conv = _module(gm, prev) if isinstance(prev, fx.Node) else None
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or len(prev.users) != 1:
            continue
        after = _after_norm(bn)
        if after is False:
            continue
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
        conv.weight, conv.bias = w, b
        if after is None:
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            set_submodule(gm, node.target, nn.Identity())
        else:  # the norm's own activation stays where it was, as a module of its own
            set_submodule(gm, node.target, after)
        folded.append(node.target)
    gm.graph.lint()
    gm.recompile()
    return folded


def _is_pass_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCS
    if node.op == "call_method":
        return node.target in _PASS_METHODS and node.target != "size"
    return False


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = _module(gm, node)
        return isinstance(m, _ACT_MODULES) or (isinstance(m, nn.Identity))
    if node.op == "call_function":
        return node.target in _ACT_FUNCS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _wrap(layer: nn.Module, spec: nq.QuantSpec, *, dynamic: bool) -> QuantWeightLayer:
    if isinstance(layer, nn.Linear):
        q = QuantLinear(layer, spec)
        q.dynamic = dynamic
        return q
    return QuantConv(layer, spec)


def unquantized_layers(model: nn.Module, quantized: set[str]) -> list[str]:
    """Leaf layers with weights that stay in float (reported, never silently)."""
    kept = []
    for name, m in model.named_modules():
        if not name or any(name == q or name.startswith(q + ".") for q in quantized):
            continue
        if list(m.children()) or isinstance(m, (ActQuant, QuantWeightLayer, QuantEmbedding)):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            kept.append(f"{name} ({type(m).__name__})")
    return kept


def is_depthwise(layer: nn.Module) -> bool:
    """A depthwise Conv2d (one input and one output channel per group), as ONNX Runtime's depthwise kernel takes it."""
    return (isinstance(layer, nn.Conv2d) and layer.groups > 1
            and layer.groups == layer.in_channels == layer.out_channels)


def pair_safe_spec(layer: nn.Module, spec: nq.QuantSpec) -> nq.QuantSpec:
    """The weight spec of one layer under a pair limit (`QuantSpec.pair_bound`, target "portable"):
    - depthwise convolutions: the full grid, no limit. ONNX Runtime runs them with its own kernel (MLAS
      MlasConvDepthwiseKernel* / MlasConvSymDepthwiseKernel*), which widens inputs and weights to int16
      and accumulates full products in int32 on every CPU: no pair sums, nothing to saturate;
    - KxK convolutions with an odd number of input channels per group: the 7-bit grid. Their im2col rows
      (kernel position, channel) put channels of two kernel positions in one pair, so the channel pairs
      the limit constrains are not the pairs the kernel adds;
    - every other convolution and Linear layer: the limit as given (the kernels pair channels 2i, 2i+1)."""
    if not spec.pair_bound:
        return spec
    if is_depthwise(layer):
        return dataclasses.replace(spec, pair_bound=None)
    if isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.weight[0, 0].numel() > 1 and \
            (layer.in_channels // layer.groups) % 2:
        return dataclasses.replace(spec, pair_bound=None, grid_bits=7)
    return spec


def table_spec(layer: nn.Embedding, spec: nq.QuantSpec) -> nq.QuantSpec:
    """The spec of one embedding table from the weights' spec: symmetric signed codes on the full grid
    (a lookup has no pair sums), per group of a row where the weights use groups below 8 bits and the
    row divides into them, else one scale per row."""
    grouped = spec.granularity == "group" and spec.bits < 8 and layer.embedding_dim % spec.group_size == 0
    return dataclasses.replace(spec, signed=True, symmetric=True, pair_bound=None, grid_bits=None,
                               granularity="group" if grouped else "channel", axis=0)


def prepare(model: nn.Module, *, weight_specs: dict[str, nq.QuantSpec], act_spec: nq.QuantSpec | None,
            selector: Selector | None, dynamic: bool, fold_bn: bool = True,
            quantize_output: bool = False, equalize: bool = False,
            embeddings: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Return (prepared model, structure). `weight_specs` maps layer names to their weight spec
    (layers not in it use the spec under key "*"). Static activations need `act_spec`. `embeddings`:
    the selector also picks `nn.Embedding` tables (`QuantEmbedding`; those with `max_norm`, which
    rewrites the table on lookup, stay float)."""
    structure: dict[str, Any] = {"mode": "module", "folded_bn": [], "layers": [], "activations": []}
    gm = trace(model) if (act_spec is not None and not dynamic) or fold_bn else None
    root = gm if gm is not None else model
    if gm is not None:
        structure["mode"] = "fx"
        if fold_bn:
            structure["folded_bn"] = fold_batchnorm(gm)
        if equalize:
            from slimkit.quantize.equalize import equalize as cross_layer_equalize

            structure["equalized"] = [list(p) for p in cross_layer_equalize(gm)]
    layers = select(root, selector, default_types=QUANTIZABLE + ((nn.Embedding,) if embeddings else ()), what="quantize")
    tables = [(n, m) for n, m in layers if embeddings and isinstance(m, nn.Embedding) and m.max_norm is None]
    layers = [(n, m) for n, m in layers if isinstance(m, QUANTIZABLE)]
    if tables:
        for name, table in tables:
            set_submodule(root, name, QuantEmbedding(table, table_spec(table, weight_specs.get(name, weight_specs["*"]))))
        structure["embeddings"] = [n for n, _ in tables]
    wrapped: dict[str, QuantWeightLayer] = {}
    for name, layer in layers:
        spec = weight_specs.get(name, weight_specs["*"])
        if isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.groups > 1 and spec.granularity == "group":
            spec = dataclasses.replace(spec, granularity="channel", axis=0)
        spec = pair_safe_spec(layer, spec)
        q = _wrap(layer, spec, dynamic=dynamic)
        set_submodule(root, name, q)
        wrapped[name] = q
    structure["layers"] = list(wrapped)
    if act_spec is not None and not dynamic:
        if gm is not None:
            gm.recompile()
            structure["activations"] = _insert_act_quant(gm, wrapped, act_spec, quantize_output)
        else:
            for name, q in wrapped.items():  # fallback: each layer quantizes its own input (and a conv its output)
                aq = ActQuant(act_spec, name + ".input")
                q.input_owned = aq
                q.link_input(aq)
                structure["activations"].append(name + ".input_owned")
                if isinstance(q, QuantConv):
                    q.output_owned = ActQuant(act_spec, name + ".output")
                    structure["activations"].append(name + ".output_owned")
    return root, structure


def _insert_act_quant(gm: fx.GraphModule, wrapped: dict[str, QuantWeightLayer], spec: nq.QuantSpec,
                      quantize_output: bool) -> list[str]:
    graph = gm.graph
    quant_at: dict[fx.Node, str] = {}  # tensor node -> ActQuant name
    links: list[tuple[str, fx.Node]] = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    targets = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wrapped:
            continue
        src = node.args[0]
        while isinstance(src, fx.Node) and _is_pass_through(gm, src) and isinstance(src.args[0], fx.Node):
            src = src.args[0]
        targets.append(src)
        links.append((node.target, src))
        out = node
        while len(out.users) == 1 and _is_activation(gm, next(iter(out.users))):
            out = next(iter(out.users))
        is_output = any(u.op == "output" for u in out.users)
        if not is_output or quantize_output:
            targets.append(out)
    names = []
    for tensor in sorted(set(targets), key=order.__getitem__):
        name = f"act_quant_{len(names)}"
        gm.add_submodule(name, ActQuant(spec, name))
        with graph.inserting_after(tensor):
            qnode = graph.call_module(name, (tensor,))
        tensor.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        quant_at[tensor] = name
        names.append(name)
    for layer_name, src in links:
        wrapped[layer_name].link_input(gm.get_submodule(quant_at[src]))
    graph.lint()
    gm.recompile()
    return names


def act_quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


def weight_layers(model: nn.Module) -> dict[str, QuantWeightLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightLayer)}


def embedding_tables(model: nn.Module) -> dict[str, QuantEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}

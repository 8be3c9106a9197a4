"""Which quantized tensor costs the most accuracy: leave-one-out attribution of the output error.

`blame(quantized, reference, batch)` measures the quantized model's output SQNR against the float
reference, then, for each activation quantizer in turn, the SQNR with only that quantizer switched off
(that tensor in float, everything else as deployed). The difference, in dB, is how much of the output
noise that tensor's quantization is responsible for. Given the layers' float weights (`float_weights`,
which `slimkit.quantize(..., blame=True)` keeps from before rounding: folded, and equalized if asked),
each layer's weights are put back in float in turn too, so weights and activations are ranked in one
table, worst first. Two more forwards give the SQNR with every activation in float (the weights'
share) and, with float weights, with every weight in float (the activations' share).
Cost: one forward of `batch` per quantizer and per layer.

What to do with a high row: keep the layer that consumes the tensor (or owns the weights) in float
(`keep_float`), give the tensor a finer threshold (calibration method), round the weights better
(`gptq`, `adaround`), give the layer more bits (`mixed_precision`), or accept it — the table says what
each costs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from slimkit.errors import ModelError
from slimkit.quantize.graph import weight_layers
from slimkit.quantize.modules import ActQuant
from slimkit.quantize.numerics import sqnr_db
from slimkit.quantize.ptq import call_model


def _node_name(node) -> str:
    return str(node.target) if getattr(node, "op", None) == "call_module" else str(getattr(node, "name", node))


def _where(model: nn.Module) -> dict[str, str]:
    """Quantizer name -> 'producer -> consumers' (from the traced graph; else the layer it feeds)."""
    out = {}
    graph = getattr(model, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(model.get_submodule(node.target), ActQuant):
                users = ", ".join(map(_node_name, node.users))
                out[node.target] = f"{_node_name(node.args[0])} -> {users}"
    for name, m in model.named_modules():
        if isinstance(m, ActQuant) and name not in out:
            owner = name.rsplit(".", 1)[0]
            out[name] = f"input of {owner}" if name.endswith(".input_owned") else \
                f"output of {owner}" if name.endswith(".output_owned") else name
    return out


FloatWeights = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def _weight_and_bias(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copies of a quantized layer's current weight and bias (None without a bias)."""
    return layer.layer.weight.detach().clone(), None if layer.layer.bias is None else layer.layer.bias.detach().clone()


def float_layer_weights(model: nn.Module) -> FloatWeights:
    """Each quantized layer's current (float) weight and bias: call before rounding and bias correction."""
    return {n: _weight_and_bias(m) for n, m in weight_layers(model).items()}


@contextmanager
def _float_layers(layers: dict[str, nn.Module], float_weights: FloatWeights, names: list[str]):
    """Temporarily run the named layers (of `layers`, name -> quantized layer) with their float weights and
    biases, unquantized."""
    saved = {}
    try:
        for n in names:
            layer = layers[n]
            w, b = float_weights[n]
            saved[n] = (*_weight_and_bias(layer), layer.enabled)
            layer.layer.weight.data.copy_(w)
            if layer.layer.bias is not None:
                layer.layer.bias.data.copy_(b if b is not None else torch.zeros_like(layer.layer.bias))
            layer.enabled = False
        yield
    finally:
        for n, (w, b, enabled) in saved.items():
            layer = layers[n]
            layer.layer.weight.data.copy_(w)
            if b is not None:
                layer.layer.bias.data.copy_(b)
            layer.enabled = enabled


@torch.no_grad()
def blame(quantized: nn.Module, reference: nn.Module, batch, float_weights: FloatWeights | None = None) -> dict:
    """Leave-one-out attribution of `quantized`'s output error to its activation quantizers and, given
    `float_weights` (`float_layer_weights` of the model before rounding), to each layer's weights.

    Returns {"sqnr_db": the quantized model's output SQNR (dB) vs `reference` on `batch`,
    "weights_only_sqnr_db": the same with every activation in float (None without activation quantizers),
    "activations_only_sqnr_db": with every weight in float (None without `float_weights`),
    "rows": [{"kind": "activation" | "weights", "quantizer" (quantizer or layer name), "tensor",
    "sqnr_db" (with that one in float), "gain_db"}, ...] sorted by gain, largest first}.
    `batch`: the model's input (a tensor, or a tuple of its inputs). The model is left as it was given.
    """
    quantizers = {n: m for n, m in quantized.named_modules() if isinstance(m, ActQuant) and m.mode == "quant"}
    all_layers = weight_layers(quantized)
    layers = [n for n, m in all_layers.items() if m.enabled and n in (float_weights or {})]
    if not quantizers and not layers:
        raise ModelError("blame: the model has no calibrated activation quantizer (static mode quantizes "
                         "activations; weight-only and dynamic models have none to blame) and no float weights "
                         "were given to compare its layers' weights with")
    quantized.eval()
    ref = call_model(reference.eval(), batch)
    base = sqnr_db(ref, call_model(quantized, batch))
    where = _where(quantized)
    rows = []

    def row(kind: str, name: str, tensor: str) -> None:
        s = sqnr_db(ref, call_model(quantized, batch))
        rows.append({"kind": kind, "quantizer": name, "tensor": tensor, "sqnr_db": round(s, 3),
                     "gain_db": round(s - base, 3)})

    weights_only = activations_only = None
    try:
        for name, q in quantizers.items():
            q.mode = "off"
            row("activation", name, where.get(name, name))
            q.mode = "quant"
        if quantizers:
            for q in quantizers.values():
                q.mode = "off"
            weights_only = round(sqnr_db(ref, call_model(quantized, batch)), 3)
    finally:
        for q in quantizers.values():
            q.mode = "quant"
    for name in layers:
        with _float_layers(all_layers, float_weights, [name]):
            row("weights", name, f"weights of {name}" + (" (and its per-batch input quantization)"
                                                         if all_layers[name].dynamic else ""))
    if layers:
        with _float_layers(all_layers, float_weights, layers):
            activations_only = round(sqnr_db(ref, call_model(quantized, batch)), 3)
    rows.sort(key=lambda r: -r["gain_db"])
    return {"sqnr_db": round(base, 3), "weights_only_sqnr_db": weights_only,
            "activations_only_sqnr_db": activations_only, "rows": rows}


def format_blame(result: dict, top: int = 5) -> list[str]:
    """A few lines for people: the overall split, then the `top` worst tensors."""
    split = []
    if result.get("weights_only_sqnr_db") is not None:
        split.append(f"with every activation in float {result['weights_only_sqnr_db']:.2f} dB (the weights' share)")
    if result.get("activations_only_sqnr_db") is not None:
        split.append(f"with every weight in float {result['activations_only_sqnr_db']:.2f} dB (the activations' share)")
    lines = [f"output SQNR {result['sqnr_db']:.2f} dB" + "".join("; " + x for x in split)]
    for r in result["rows"][:top]:
        what = r["tensor"] if r.get("kind") == "weights" else f"{r['quantizer']} ({r['tensor']})"
        lines.append(f"  {r['gain_db']:+.2f} dB if float: {what}")
    return lines

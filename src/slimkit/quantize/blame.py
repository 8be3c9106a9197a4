"""Which quantized activation costs the most accuracy: leave-one-out attribution of the output error.

`blame(quantized, reference, batch)` measures the quantized model's output SQNR against the float
reference, then, for each activation quantizer in turn, the SQNR with only that quantizer switched off
(that tensor in float, everything else as deployed). The difference, in dB, is how much of the output
noise that tensor's quantization is responsible for; the rows come sorted, worst first. One more
forward with every activation quantizer off gives the SQNR of the weights' quantization alone, so the
split between weights and activations is visible too. Cost: one forward of `batch` per quantizer.

What to do with a high row: keep the layer that consumes the tensor in float (`keep_float`), give
the tensor a finer threshold (calibration method), or accept it — the table says what each costs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.errors import ModelError
from slimkit.quantize.modules import ActQuant
from slimkit.quantize.numerics import sqnr_db
from slimkit.quantize.ptq import _call


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
            out[name] = f"input of {name.rsplit('.', 1)[0]}" if name.endswith(".input_owned") else name
    return out


@torch.no_grad()
def blame(quantized: nn.Module, reference: nn.Module, batch) -> dict:
    """Leave-one-out attribution of `quantized`'s output error to its activation quantizers.

    Returns {"sqnr_db": the quantized model's output SQNR (dB) vs `reference` on `batch`,
    "weights_only_sqnr_db": the same with every activation in float, "rows": [{"quantizer", "tensor",
    "sqnr_db" (with that quantizer off), "gain_db"}, ...] sorted by gain, largest first}. `batch`: the
    model's input (a tensor, or a tuple of its inputs).
    The model is left as it was given.
    """
    quantizers = {n: m for n, m in quantized.named_modules() if isinstance(m, ActQuant) and m.mode == "quant"}
    if not quantizers:
        raise ModelError("blame: the model has no calibrated activation quantizer (static mode quantizes "
                         "activations; weight-only and dynamic models have none to blame)")
    quantized.eval()
    ref = _call(reference.eval(), batch)
    base = sqnr_db(ref, _call(quantized, batch))
    where = _where(quantized)
    rows = []
    try:
        for name, q in quantizers.items():
            q.mode = "off"
            s = sqnr_db(ref, _call(quantized, batch))
            q.mode = "quant"
            rows.append({"quantizer": name, "tensor": where.get(name, name), "sqnr_db": round(s, 3),
                         "gain_db": round(s - base, 3)})
        for q in quantizers.values():
            q.mode = "off"
        weights_only = sqnr_db(ref, _call(quantized, batch))
    finally:
        for q in quantizers.values():
            q.mode = "quant"
    rows.sort(key=lambda r: -r["gain_db"])
    return {"sqnr_db": round(base, 3), "weights_only_sqnr_db": round(weights_only, 3), "rows": rows}


def format_blame(result: dict, top: int = 5) -> list[str]:
    """A few lines for people: the overall split, then the `top` worst activations."""
    lines = [f"output SQNR {result['sqnr_db']:.2f} dB; with every activation in float "
             f"{result['weights_only_sqnr_db']:.2f} dB (the weights' share)"]
    for r in result["rows"][:top]:
        lines.append(f"  {r['gain_db']:+.2f} dB if float: {r['quantizer']} ({r['tensor']})")
    return lines

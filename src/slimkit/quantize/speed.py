"""Never slower than float, by default: the int8 ONNX file is timed against the float one on ONNX Runtime
(interleaved rounds, `evaluate.latency.compare_latency`) at the configured batch sizes; where int8 is
slower, the layers with the fewest MACs (where quantize/dequantize overhead outweighs the cheaper
arithmetic) are kept in float, more at each step (1, 2, 4, ... layers), until int8 is no slower at any
batch size, or every layer is float. The notes say what was kept and what was measured."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from slimkit.evaluate.latency import compare_latency, ort_inputs, ort_session, speedup


def layer_macs(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each quantized layer (the wrappers of `graph.weight_layers`, which run the
    forward) for one example, by forward hooks."""
    macs: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            w = module.weight
            per_output = w[0].numel()  # inputs summed into one output element (in/groups x kernel)
            macs[name] = int(output.numel() // max(output.shape[0], 1)) * per_output
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    return macs


def measure(float_model: nn.Module, quantized: nn.Module, example: torch.Tensor, batch_sizes: list[int],
            threads: int) -> dict[int, dict[str, Any]]:
    """{batch size: speedup of int8 over float (ONNX Runtime, `threads` threads), with both medians}."""
    from slimkit.export.onnx import export_onnx
    from slimkit.quantize.export import export_quantized

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        f_path = export_onnx(float_model, Path(tmp) / "float.onnx", example[:1])
        q_path = export_quantized(quantized, Path(tmp) / "int8.onnx", example[:1])
        sessions = {"float": ort_session(f_path, threads), "int8": ort_session(q_path, threads)}
        for bs in batch_sizes:
            x = example[:1].expand(bs, *example.shape[1:]).contiguous()
            feeds = {k: ort_inputs(s, x) for k, s in sessions.items()}
            stats = compare_latency({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()})
            out[bs] = {**speedup(stats["float"], stats["int8"]), "float_ms": stats["float"]["median_ms"],
                       "int8_ms": stats["int8"]["median_ms"]}
    return out


def _slower(result: dict[int, dict[str, Any]]) -> list[int]:
    return [bs for bs, r in result.items() if r["speedup"] < 1.0]


def _describe(result: dict[int, dict[str, Any]]) -> str:
    return ", ".join(f"batch {bs}: int8 {r['int8_ms']:.3f} ms vs float {r['float_ms']:.3f} ms "
                     f"({r['speedup']:.2f}x{'' if r['reliable'] else ', rounds disagree'})" for bs, r in result.items())


def keep_float_where_slower(float_model: nn.Module, quantized: nn.Module, example: torch.Tensor, config,
                            requantize: Callable[[list[str]], nn.Module]) -> tuple[nn.Module, list[str], dict]:
    """The quantized model, or one with its cheapest layers kept float, that is no slower than float.

    requantize(names) quantizes again with `names` kept float (the same config otherwise). Returns
    (model, notes, record); model is None when every layer had to stay float."""
    from slimkit.quantize.graph import weight_layers

    where = f"ONNX Runtime, {config.speed_threads} thread(s)"
    first = measure(float_model, quantized, example, config.speed_batch_sizes, config.speed_threads)
    record = {"runtime": "onnxruntime-cpu", "threads": config.speed_threads, "steps": [{"kept_float": [], **_jsonable(first)}]}
    if not _slower(first):
        return quantized, [f"speed check ({where}): {_describe(first)}"], record
    layers = weight_layers(quantized)
    macs = layer_macs(quantized, layers, example)
    order = sorted(layers, key=lambda n: macs.get(n, 0))
    k = 1
    while k < len(order):
        names = order[:k]
        candidate = requantize(names)
        result = measure(float_model, candidate, example, config.speed_batch_sizes, config.speed_threads)
        record["steps"].append({"kept_float": names, **_jsonable(result)})
        if not _slower(result):
            return candidate, [f"kept float: {', '.join(names)} (the layers with the fewest MACs): with all layers "
                               f"int8 the file was slower than float ({_describe(first)}); now {_describe(result)} "
                               f"({where}; speed_check=False turns this off)"], record
        k *= 2
    return None, [f"kept float: every layer: int8 was slower than float at every step ({_describe(first)}; "
                  f"{where}); on this model quantize/dequantize costs more than the integer arithmetic saves "
                  "(speed_check=False keeps int8 anyway)"], record


def _jsonable(result: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {"batches": {str(bs): {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                        for bs, r in result.items()}}

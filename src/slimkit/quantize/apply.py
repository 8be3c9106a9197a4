"""`slimkit.quantize(model, QuantConfig(...), task=task)`: the quantization stage.

Order: trace + fold BN (+ cross-layer equalization) -> wrap layers -> weight thresholds ->
activation statistics (one pass) -> activation thresholds -> AdaRound or GPTQ -> bias correction -> QAT.
(Bias correction comes after the rounding: AdaRound fits the float model's outputs, and a bias already
corrected for round-to-nearest would shift that target.)
The result simulates the integer model exactly in PyTorch and exports to ONNX QDQ
(`slimkit.export(q, "model.onnx", example_input=...)`), which ONNX Runtime runs on int8 kernels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimkit.core import registry
from slimkit.core.registry import Technique, chained
from slimkit.core.state import ATTR, copy_model, get_state, record_stage
from slimkit.errors import CalibrationError, ConfigError
from slimkit.quantize import graph as qgraph
from slimkit.quantize import numerics as nq
from slimkit.quantize import ptq
from slimkit.quantize.gptq import gptq
from slimkit.quantize.blame import blame, float_layer_weights, format_blame
from slimkit.quantize.config import QuantConfig
from slimkit.quantize.embedding import QuantEmbedding
from slimkit.quantize.modules import ActQuant, QuantConv, QuantWeightLayer, deployable, nbits_exportable
from slimkit.quantize.report import blame_section


def _build(model: nn.Module, config: QuantConfig, *, bits: dict[str, int] | None = None,
           layers: list[str] | None = None, tables: list[str] | None = None,
           equalize: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Structure only (deterministic): used by `quantize` and by `restore` on load (which names the
    `layers` and embedding `tables` exactly)."""
    state = get_state(model)
    weight_specs = {"*": config.weight_spec()}
    for name, b in (bits or {}).items():
        weight_specs[name] = config.weight_spec(b)
    gm_equalize = equalize and config.mode != "dynamic"
    embeddings = config.embeddings if layers is None else bool(tables)
    names = None if layers is None else layers + (tables or [])
    prepared, structure = qgraph.prepare(
        model, weight_specs=weight_specs, act_spec=config.activation_spec(), selector=config.layer_selector(names),
        dynamic=config.mode == "dynamic", fold_bn=config.fold_bn and config.mode != "dynamic",
        quantize_output=config.quantize_output, equalize=gm_equalize, embeddings=embeddings)
    object.__setattr__(prepared, ATTR, state)
    if bits:
        structure["bits"] = dict(bits)
    return prepared, structure


@chained("quantize")
def quantize(model: nn.Module, config: QuantConfig | None = None, *, task=None, calibration_data=None,
             **kwargs: Any) -> nn.Module:
    """Quantize `model`; returns a new model (the input is untouched).

    task: supplies calibration data (its calibration split) for static activations, bias correction,
    AdaRound and mixed precision, and training data for QAT. calibration_data: a tensor or list of
    batches used instead of the task's calibration split. Keyword arguments are QuantConfig fields.
    """
    if config is None:
        config = QuantConfig(**kwargs)
    elif kwargs:
        config = QuantConfig(**{**config.to_dict(), **kwargs})
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize expects a QuantConfig, got {type(config).__name__}")
    src = copy_model(model).eval()
    needs_data = (config.mode == "static" or config.bias_correction or config.adaround or config.gptq
                  or config.mixed_precision or config.blame)
    batches = None
    if needs_data:
        data = calibration_data if calibration_data is not None else task
        if data is None:
            raise CalibrationError("static quantization needs calibration data: pass task=... or calibration_data=...")
        batches = ptq.batches_from(data, max_samples=config.calibration_samples)
        if not batches:
            raise CalibrationError("the calibration set is empty: give at least one sample")
    notes: list[str] = []
    bits = None
    if config.mixed_precision is not None:
        from slimkit.quantize.mixed import assign_bits

        bits, report = assign_bits(src, config, task, batches)
        notes.extend(report)
    new, structure = _build(src, config, bits=bits, equalize=config.equalize)
    layers = qgraph.weight_layers(new)
    float_layers = None
    if config.blame or ((config.adaround or config.gptq) and config.bias_correction):
        # AdaRound and GPTQ bake their rounding into the weights and bias correction moves the biases: keep
        # the float ones (bias correction measures against them, blame puts them back one layer at a time)
        float_layers = float_layer_weights(new)
    tables = qgraph.embedding_tables(new)
    for layer in [*layers.values(), *tables.values()]:
        layer.calibrate_weight(config.weight_calibration, config.percentile)
    if config.mode == "static":
        stats = ptq.collect_activation_stats(new, batches)
        ptq.apply_activation_thresholds(new, stats, config.calibration, config.percentile)
    if config.adaround:
        ptq.adaround(new, batches, iters=config.adaround_iters, layers=config.adaround_layers)
    if config.gptq:
        ratios = sorted(gptq(new, batches).values())
        notes.append(f"GPTQ rounding of {len(ratios)} layer(s): output error on the calibration inputs "
                     f"{ratios[len(ratios) // 2]:.2f}x round-to-nearest's (median)")
    if config.bias_correction:  # after the rounding: it corrects the rounding's residual mean error
        ptq.bias_correction(new, batches, float_layers and {n: w for n, (w, _) in float_layers.items()})
    if config.qat_epochs:
        new = _qat(new, config, task)
    if config.blame:
        blamed = blame(new, copy_model(model), batches[0], float_layers)
        notes.extend("blame: " + line.strip() for line in format_blame(blamed))
        object.__setattr__(new, "slimkit_blame", blamed)
    # -- what the result is, in words --------------------------------------------------------
    wspec = config.weight_spec()
    structure["weight_grid"] = [wspec.qmin, wspec.qmax]
    if wspec.pair_bound:
        structure["weight_pair_bound"] = wspec.pair_bound
        notes.append(_pair_note(layers, config.target, wspec.pair_bound))
    elif config.integer_matmul() and wspec.bits == 8 and wspec.signed:
        notes.append(f"int8 weights on the full grid (target {config.target!r}): ONNX Runtime may saturate int16 pair "
                     "sums on x86 CPUs without VNNI (AVX2 only), so this file is right only on the target's CPUs")
    if tables:
        notes.append(_table_note(tables))
    kept = qgraph.unquantized_layers(new, set(layers) | set(tables))
    if kept:
        notes.append("kept in float (not quantizable or excluded): " + ", ".join(kept))
    if structure["folded_bn"]:
        notes.append(f"folded {len(structure['folded_bn'])} BatchNorm layers into the preceding convolutions")
    convs = [n for n, m in layers.items() if isinstance(m, QuantConv)]
    if config.mode == "dynamic" and convs:
        notes.append(f"dynamic mode: {len(convs)} convolution(s) store int8 weights but run as dequantize + float "
                     "convolution (ONNX Runtime has no dynamically quantized convolution kernel): the file is "
                     "smaller, those layers are not faster; mode='static' runs them on int8 kernels")
    if structure["mode"] == "module" and config.mode == "static":
        notes.append("the model could not be traced with torch.fx: activations are quantized at each layer's input "
                     "and each convolution's output (no BatchNorm folding, no quantizer shared between layers), so "
                     "ONNX Runtime runs the layers on int8 kernels with extra quantize/dequantize steps between them")
    simulated = False
    act = config.activation_spec()
    nbits = [n for n, m in layers.items() if nbits_exportable(m)]
    if nbits:
        notes.append(f"int4 weights of {len(nbits)} Linear layer(s) stored packed (two per byte, one scale per "
                     f"{wspec.group_size} weights) and run by ONNX Runtime's MatMulNBits")
    if not deployable(wspec) and len(nbits) < len(layers):
        simulated = True
        hint = (" (int4 runs for real on Linear layers with weight-only mode and group_size a power of two >= 16)"
                if wspec.bits == 4 else "")
        notes.append(f"weights {config.weights} are simulated (no integer kernel for this type on CPU){hint}")
    if act is not None and not deployable(act):
        simulated = True
        notes.append(f"activations {config.activations} are simulated (no integer kernel for this type on CPU)")
    if bits and any(b not in (8, 16) for b in bits.values()):
        simulated = True
        notes.append("mixed precision below 8 bits is simulated in PyTorch; the ONNX file stores those layers as int8")
    structure["notes"] = notes
    record_stage(new, "quantize", config, structure)
    object.__setattr__(new, "slimkit_notes", notes)
    object.__setattr__(new, "slimkit_simulated", simulated)
    if config.speed_check and config.mode in ("static", "dynamic") and not simulated and deployable(wspec):
        return _never_slower(model, new, config, task, batches, calibration_data)
    return new.eval()


def _table_note(tables: dict) -> str:
    """What happened to the embedding tables, in words."""
    from slimkit.quantize.embedding import gather_block_exportable

    n = sum(m.weight.numel() for m in tables.values())
    packed = [name for name, m in tables.items() if gather_block_exportable(m.spec)]
    bits = sorted({m.spec.bits for m in tables.values()})
    text = (f"{len(tables)} embedding table(s) ({n:,} weights) quantized to int{'/'.join(map(str, bits))}, "
            f"symmetric")
    if packed:
        gs = next(iter(tables.values())).spec.group_size
        text += (f"; {len(packed)} stored packed (two 4-bit codes per byte, one scale per {gs} weights of a row) "
                 "and gathered by ONNX Runtime's GatherBlockQuantized")
    rest = [m for name, m in tables.items() if name not in packed]
    if rest:
        store = "int8" if all(m.spec.bits <= 8 for m in rest) else "int8/int16"
        text += (f"; {len(rest)} stored as {store} codes with one scale per row: ONNX Gather of the codes, then "
                 "Cast and Mul by the row's scale (standard ops, only the rows looked up are dequantized)")
        if any(m.spec.bits not in (8, 16) for m in rest):
            text += f" — {', '.join(str(b) for b in bits if b not in (8, 16))}-bit values kept in wider integers"
    return text


def _pair_note(layers: dict, target: str, bound: int) -> str:
    """What the pair limit of target 'portable' / 'x86-avx2' did, layer kinds and pairs changed."""
    import dataclasses

    limited = {n: m for n, m in layers.items() if m.enabled and m.spec.pair_bound}
    changed = total = 0
    for m in limited.values():
        w = m.layer.weight.detach()
        free = nq.quantize(w, m.weight_scale.detach(), m.weight_zero_point, dataclasses.replace(m.spec, pair_bound=None))
        diff, even = m.weight_codes() != free, w.shape[1] - w.shape[1] % 2
        changed += int((diff[:, 0:even:2] | diff[:, 1:even:2]).sum())
        total += diff[:, 0:even:2].numel()
    narrow = [n for n, m in layers.items() if m.enabled and m.spec.grid_bits]
    full = [n for n, m in layers.items() if m.enabled and not m.spec.pair_bound and not m.spec.grid_bits]
    text = (f"int8 weights for every CPU (target {target!r}): on x86 without VNNI ONNX Runtime adds u8 x s8 products "
            f"of input channels 2i, 2i+1 in int16, so in {len(limited)} layer(s) each same-sign pair is limited to "
            f"|q_a| + |q_b| <= {bound} ({changed} of {total} pairs changed, {100 * changed / max(total, 1):.1f}%)")
    if narrow:
        text += (f"; {len(narrow)} KxK convolution(s) with an odd number of input channels use the 7-bit grid "
                 f"[-64, 63] ({', '.join(narrow[:3])}{', ...' if len(narrow) > 3 else ''})")
    if full:
        text += f"; {len(full)} depthwise convolution(s) keep the full grid (their kernel accumulates in int32)"
    return text + "; target='x86-vnni' or 'arm64' lifts the limit where those kernels never run"


def _never_slower(model, new, config, task, batches, calibration_data) -> nn.Module:
    """The speed check (`quantize/speed.py`): keep float where int8 is slower on ONNX Runtime. `model` is
    the caller's float model (untouched), the baseline of the comparison."""
    from slimkit.quantize.speed import keep_float_where_slower

    example = batches[0] if batches else (task.example_input(1) if task is not None else None)
    if not isinstance(example, torch.Tensor):
        new.slimkit_notes.append("speed not checked against float: no example input (pass task=... or "
                                 "calibration_data=...)")
        return new.eval()

    def requantize(names: list[str]) -> nn.Module:
        cfg = QuantConfig(**{**config.to_dict(), "keep_float": config.keep_float + names, "speed_check": False})
        return quantize(model, cfg, task=task, calibration_data=calibration_data)

    final, notes, record = keep_float_where_slower(model, new, example, config, requantize)
    if final is None:  # every layer float: the float model itself, recorded as this stage
        final = copy_model(model).eval()
        record_stage(final, "quantize", config, {"all_float": True, "layers": [], "notes": notes, "speed": record})
        object.__setattr__(final, "slimkit_notes", notes)
        object.__setattr__(final, "slimkit_simulated", False)
        return final.eval()
    final.slimkit_notes.extend(notes)  # the stage record holds the same list
    get_state(final)["stages"][-1]["structure"]["speed"] = record
    return final.eval()


def _qat(model: nn.Module, config: QuantConfig, task) -> nn.Module:
    """Quantization-aware training with the shared trainer: STE through rounding, LSQ step sizes."""
    from slimkit.core.trainer import TrainConfig, fit

    if task is None:
        raise ConfigError("QAT (qat_epochs > 0) needs a task with training data")
    for m in model.modules():
        if isinstance(m, (ActQuant, QuantWeightLayer)):
            m.learnable()
    with torch.enable_grad():  # callers may be inside no_grad
        result = fit(model, task, TrainConfig(epochs=config.qat_epochs, lr=config.qat_lr, optimizer="adam"),
                     description="qat")
    out = result.model
    for m in out.modules():  # back to plain buffers: the learned step sizes are now fixed values
        if isinstance(m, ActQuant) and isinstance(m.scale, nn.Parameter):
            s = m.scale.detach().abs().clone()
            del m.scale
            m.register_buffer("scale", s)
        if isinstance(m, QuantWeightLayer) and isinstance(m.weight_scale, nn.Parameter):
            s = m.weight_scale.detach().abs().clone()
            del m.weight_scale
            m.register_buffer("weight_scale", s)
    object.__setattr__(out, ATTR, get_state(model))
    return out


def restore(model: nn.Module, config: QuantConfig, structure: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized architecture on a fresh source model (scales load with the weights)."""
    if structure.get("all_float"):  # the speed check kept every layer float
        object.__setattr__(model, "slimkit_notes", list(structure.get("notes", [])))
        return model
    if "weight_grid" not in structure and config.target != "x86-vnni":
        # written before `target` existed: its int8 weights use the full grid, whatever the default is now
        config = QuantConfig(**{**config.to_dict(), "target": "x86-vnni"})
    new, _ = _build(model, config, bits=structure.get("bits"), layers=structure.get("layers"),
                    tables=structure.get("embeddings", []))
    for q in qgraph.act_quantizers(new):
        q.mode = "quant"
    object.__setattr__(new, "slimkit_notes", list(structure.get("notes", [])))
    return new


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (ActQuant, QuantWeightLayer, QuantEmbedding)) for m in model.modules())


def _write_artifact(model: nn.Module, path: Path, task) -> Path:
    """The deployable file of a quantized model: its int8 ONNX (QDQ), checked against the simulation."""
    from slimkit.quantize.export import check_parity, export_quantized

    example = task.example_input(1)
    out = export_quantized(model, Path(path).with_suffix(".onnx"), example)
    parity = check_parity(model, out, task.example_input(64))
    notes = getattr(model, "slimkit_notes", [])
    what = "ONNX Runtime int8 vs slimkit simulation" if is_quantized(model) else "float file (kept float): ONNX Runtime vs PyTorch"
    notes.append(f"{what} on 64 inputs: max |diff| {parity['max_abs_diff']:.3g}, "
                 f"top-1 agreement {parity.get('top1_agreement', float('nan')):.4f}")
    return out


def _demo(model: nn.Module, task) -> QuantConfig:
    return QuantConfig(weights="int8", activations="uint8", mode="static", per_channel=True, calibration="percentile",
                       blame=True)


def _candidates(auto) -> dict[str, dict]:
    """What the advisor tries: static int8 with per-channel weights. speed_check off: the advisor times every
    candidate itself and never recommends one slower than the original, and an "int8" candidate must be int8
    (the check could hand back a float model)."""
    return {"int8": {"weights": "int8", "activations": "uint8", "per_channel": True, "mode": "static",
                     "speed_check": False}}


registry.register(Technique(
    name="quantize", family="quantization", config_cls=QuantConfig, apply=quantize,
    summary="int8/int16/int4 weights and activations (static, dynamic, weight-only), calibrated; ONNX QDQ on int8 kernels",
    restore=restore, demo=_demo, write_artifact=_write_artifact, runtime="ort", order=80,
    sections={"blame": blame_section}, candidates=_candidates,
    describe=lambda label: "int8 static quantization (ONNX QDQ, per-channel)", next=()))  # final: its wrapped layers must not be selected by another technique


def _register_exporter() -> None:
    from slimkit.export import register_exporter

    def _export(model, path, example_input=None, **kw):
        from slimkit.quantize.export import export_quantized

        if example_input is None:
            raise ConfigError("ONNX export of a quantized model needs example_input (e.g. task.example_input(1))")
        return export_quantized(model, path, example_input, **kw)

    register_exporter(".onnx", _export, is_quantized)


_register_exporter()

from slimkit.quantize import pt2e as _pt2e  # noqa: E402,F401  (registers the quantize_pt2e technique)

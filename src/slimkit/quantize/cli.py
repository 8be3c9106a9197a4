"""`slimkit quantize MODEL --data D --out DIR`: quantize a trained model, write its int8 ONNX and
slimkit model, print accuracy, bytes and ONNX Runtime latency before and after."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import TrustFactoryOpt


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_command(
        model: str = typer.Argument(..., help="zoo:NAME, a saved .safetensors model, or package.module:factory"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        weights_file: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory or zoo model"),
        trust_factory: bool = TrustFactoryOpt,
        weight_type: str = typer.Option("int8", "--weight-type", help="weight type: int8, int16, int4, intN/uintN (2-16 bits)"),
        activation_type: str = typer.Option("uint8", "--activation-type",
                                            help="activation type: uint8, int8, int16, ... or none"),
        mode: str = typer.Option("static", "--mode", help="static | dynamic | weight_only"),
        per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="weight scales per output channel"),
        calibration: str = typer.Option("percentile", "--calibration", help="minmax | ema_minmax | percentile | mse | kl"),
        weight_calibration: str = typer.Option("minmax", "--weight-calibration", help="minmax | percentile | mse"),
        samples: int = typer.Option(512, "--samples", help="calibration samples"),
        equalize: bool = typer.Option(False, "--equalize", help="cross-layer equalization"),
        bias_correction: bool = typer.Option(False, "--bias-correction", help="empirical bias correction"),
        adaround: bool = typer.Option(False, "--adaround", help="learned rounding of weights"),
        gptq: bool = typer.Option(False, "--gptq", help="second-order (GPTQ) rounding of weights; fast, not with --adaround"),
        qat_epochs: int = typer.Option(0, "--qat-epochs", help="quantization-aware training epochs after PTQ"),
        keep_float: list[str] = typer.Option([], "--keep-float", help="layer name patterns left in float (repeatable)"),
        embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings",
                                        help="quantize nn.Embedding tables too (one scale per row; default on)"),
        speed_check: bool = typer.Option(True, "--speed-check/--no-speed-check",
                                         help="time int8 against float on ONNX Runtime and keep float the layers "
                                              "where int8 is slower (default on)"),
        target: str = typer.Option("portable", "--target", help="portable | x86-avx2 | x86-vnni | arm64: the CPUs "
                                   "the int8 file must be right on (portable: same-sign channel pairs limited so no int16 pair sum saturates)"),
        backend: str = typer.Option("onnx", "--backend", help="onnx: int8 QDQ for ONNX Runtime (slimkit's own "
                                    "calibration) | pt2e: int8 in PyTorch via torchao PT2E + x86 quantizer"),
        config: Optional[Path] = typer.Option(None, "--config", help="QuantConfig as YAML/JSON (replaces the options above)"),
        out: Path = typer.Option(Path("slimkit-out/quantized"), "--out", "-o", help="output folder"),
        threads: int = typer.Option(1, help="threads for latency"),
        batch_size: int = typer.Option(64, "--batch-size", help="batch for latency"),
        blame: bool = typer.Option(False, "--blame", help="measure each activation's and each layer's weights' "
                                   "share of the output error (one forward each): the five worst in the notes, "
                                   "all in blame.json"),
    ) -> None:
        """Quantize weights (and activations); write model.onnx (int8 QDQ) and model.safetensors."""
        from slimkit.cli.common import console, load_model, load_task
        from slimkit.errors import ConfigError

        if backend not in ("onnx", "pt2e"):
            raise ConfigError(f"--backend must be onnx or pt2e, got {backend!r}")
        if backend == "pt2e":
            return _pt2e(model, data, weights_file, trust_factory, samples, out, threads, batch_size)
        from slimkit.core.artifact import save
        from slimkit.core.io import output_dir
        from slimkit.evaluate import compare_latency, ort_call, predict, topk_accuracy
        from slimkit.export.onnx import export_onnx
        from slimkit.quantize import QuantConfig, check_parity, export_quantized, quantize

        if config is not None:
            cfg = QuantConfig.from_file(config)
        else:
            cfg = QuantConfig(weights=weight_type, activations=activation_type, mode=mode, per_channel=per_channel,
                              calibration=calibration, weight_calibration=weight_calibration,
                              calibration_samples=samples, equalize=equalize, bias_correction=bias_correction,
                              adaround=adaround, gptq=gptq, qat_epochs=qat_epochs, keep_float=keep_float,
                              speed_check=speed_check, target=target, embeddings=embeddings)
        if blame:
            cfg = QuantConfig(**{**cfg.to_dict(), "blame": True})
        output_dir(out)  # before calibration: an unwritable --out must not cost the run
        task = load_task(data)
        net = load_model(model, weights=weights_file, task=task, trust_factory=trust_factory)
        q = quantize(net, cfg, task=task)
        example = task.example_input(1)
        fp32_onnx = export_onnx(net, out / "fp32.onnx", example)
        q_onnx = export_quantized(q, out / "model.onnx", example)
        save(q, out / "model.safetensors")
        parity = check_parity(q, q_onnx, task.example_input(batch_size))
        x = task.example_input(batch_size)
        timing = compare_latency({"fp32": ort_call(fp32_onnx, x, threads=threads),
                                  "quantized": ort_call(q_onnx, x, threads=threads)})
        for label, m, path in (("fp32", net, fp32_onnx), ("quantized", q, q_onnx)):
            acc = topk_accuracy(*predict(m, task, "test"))["top1"] if task.metric == "accuracy" else None
            console.print(f"{label:<10} {_accuracy(acc)}{path.stat().st_size:>10,} bytes  {_ms(timing[label])} "
                          f"(onnxruntime, {threads} thread(s), batch {batch_size})", markup=False, highlight=False)
        _print_speed(console, timing["fp32"], timing["quantized"], "fp32")
        console.print(f"ONNX Runtime vs simulation: max |diff| {parity['max_abs_diff']:.3g}"
                      + (f", top-1 agreement {parity['top1_agreement']:.4f}" if "top1_agreement" in parity else ""),
                      markup=False, highlight=False)
        for note in getattr(q, "slimkit_notes", []):
            console.print(f"note: {note}", markup=False, highlight=False)
        written = [q_onnx, out / "model.safetensors"]
        if cfg.blame:  # the notes above name the five worst; the whole table as JSON
            import json

            from slimkit.core.io import write_text

            if getattr(q, "slimkit_blame", None) is not None:  # absent when the speed check kept every layer float
                written.append(write_text(out / "blame.json", json.dumps(q.slimkit_blame, indent=1)))
        console.print("wrote " + ", ".join(map(str, written)), markup=False, highlight=False)


def _pt2e(model: str, data: str, weights_file, trust_factory: bool, samples: int, out: Path, threads: int, batch_size: int) -> None:
    """`--backend pt2e`: torchao's static int8 (its own quantizer's choices), timed in PyTorch."""
    from slimkit.cli.common import console, load_model, load_task
    from slimkit.core.artifact import save
    from slimkit.core.io import output_dir
    from slimkit.evaluate import compare_latency, predict, topk_accuracy, torch_call
    from slimkit.quantize.pt2e import Pt2eConfig, quantize_pt2e

    output_dir(out)
    task = load_task(data)
    net = load_model(model, weights=weights_file, task=task, trust_factory=trust_factory)
    q = quantize_pt2e(net, Pt2eConfig(calibration_samples=samples, batch_size=batch_size), task=task)
    path = save(q, out / "model.safetensors")
    example = task.example_input(batch_size)
    timing = compare_latency({"fp32": torch_call(net, example, threads=threads),
                              "int8 pt2e": torch_call(q, example, threads=threads)})
    for label, m in (("fp32", net), ("int8 pt2e", q)):
        acc = topk_accuracy(*predict(m, task, "test"))["top1"] if task.metric == "accuracy" else None
        console.print(f"{label:<10} {_accuracy(acc)}{_ms(timing[label])} (PyTorch, {threads} thread(s), batch {batch_size})",
                      markup=False, highlight=False)
    _print_speed(console, timing["fp32"], timing["int8 pt2e"], "fp32")
    kernels = {k: v for k, v in q.kernels().items() if k.startswith("onednn.")}
    console.print(f"int8 kernels: {kernels}", markup=False, highlight=False)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes: float weights + observer statistics; the int8 "
                  "graph is rebuilt on load)", markup=False, highlight=False)


def _accuracy(acc: float | None) -> str:
    return f"accuracy {100 * acc:.2f}%  " if acc is not None else ""


def _ms(stats: dict) -> str:
    return f"{stats['median_ms']:.3f} ms (p10-p90 {stats['p10_ms']:.3f}-{stats['p90_ms']:.3f})"


def _print_speed(console, baseline: dict, candidate: dict, than: str) -> None:
    """One line with the ratio of two figures of one `compare_latency` call, and a warning when it is noisy."""
    from slimkit.evaluate import describe_speedup, speedup
    from slimkit.evaluate.latency import NOISY_SPREAD

    console.print(f"timed side by side: {describe_speedup(speedup(baseline, candidate), than)}",
                  markup=False, highlight=False)
    if baseline["noisy"] or candidate["noisy"]:
        console.print(f"warning: noisy timing (p90/p10 above {NOISY_SPREAD}x): rerun on a quiet machine before "
                      "trusting the ratio", markup=False, highlight=False)

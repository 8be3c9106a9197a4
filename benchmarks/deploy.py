"""Deployment benchmark: slimkit's int8 export on every runtime beside that runtime's own quantizer, on the
same calibration and test inputs, in one run. Prints a table, writes JSON (`--out`), exits 0 whether or not
the checks pass.

    python benchmarks/deploy.py --out deploy.json [--parts digits,effnet] [--eval-crops 256] [--calib-crops 256]

Runtimes and their own quantizers (each given the calibration inputs slimkit calibrates on):
  ort         ONNX Runtime CPU      quantize_static (QDQ, per-channel MinMax, U8S8)
  openvino    OpenVINO CPU          NNCF post-training quantization (default preset) of the fp32 IR
  executorch  ExecuTorch + XNNPACK  PT2E XNNPACKQuantizer (symmetric per-channel, static) -> XNNPACK
  litert      LiteRT                PT2E with litert-torch's quantizer (symmetric per-channel, static)

Parts:
  digits  LeNet-5 trained on the bundled digits, its test split.
  effnet  EfficientNet-Lite0 (ImageNet weights), crops of the shipped camera photographs (seed 1 test,
          seed 2 calibration), slimkit's benchmark configuration (benchmarks/quantize.py).

Per runtime and variant (fp32, slimkit int8, the runtime's own int8): top-1 agreement with PyTorch fp32,
slimkit's agreement with its own PyTorch simulation, bytes on disk, batch-1 latency on 1 thread (all
variants of a model timed in interleaved rounds; p10/p90 beside each median). ExecuTorch and LiteRT are
phone runtimes timed on this x86 host: their figures say how the programs run here, not on a phone.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check, environment, latency_fields, print_table, run_parts, write_result  # noqa: E402
from quantize import ort_static, wilson  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.core.io import quiet_native_logs  # noqa: E402
from slimkit.evaluate import compare_latency  # noqa: E402
from slimkit.export import runtimes as R  # noqa: E402
from slimkit.quantize import QuantConfig  # noqa: E402

RUNTIMES = ("ort", "openvino", "executorch", "litert")


def own_openvino(fp32_onnx: Path, out: Path, calib: np.ndarray) -> Path:
    """NNCF's default post-training quantization of OpenVINO's conversion of the fp32 ONNX file."""
    from slimkit.export.openvino import block_telemetry

    block_telemetry()
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32_onnx))
    data = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    q = nncf.quantize(model, data, subset_size=len(calib))
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out


def _pt2e(model: torch.nn.Module, example: torch.Tensor, calib: torch.Tensor, quantizer, fold: bool):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    captured = torch.export.export(model.eval(), (example,), strict=False).module()
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for i in range(len(calib)):  # captured at batch 1
            prepared(calib[i:i + 1])
    return convert_pt2e(prepared, fold_quantize=fold)


def own_executorch(model: torch.nn.Module, example: torch.Tensor, calib: torch.Tensor, out: Path) -> Path:
    """PT2E with ExecuTorch's XNNPACKQuantizer, lowered to the XNNPACK delegate."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    converted = _pt2e(model, example, calib, quantizer, fold=True)
    ep = torch.export.export(converted, (example,), strict=False)
    program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(program.buffer)
    return out


def own_litert(model: torch.nn.Module, example: torch.Tensor, calib: torch.Tensor, out: Path) -> Path:
    """PT2E with litert-torch's quantizer (symmetric per-channel, static), converted in its static mode."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize import quant_config as qc

    quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    converted = _pt2e(model, example, calib, quantizer, fold=False)
    litert_torch.config.show_progress = False
    with quiet_native_logs():
        litert_torch.convert(converted, (example,), quant_config=qc.QuantConfig(pt2e_quantizer=quantizer)).export(str(out))
    return out


def run_model(name: str, model, q, x_eval: torch.Tensor, x_cal: torch.Tensor, tmp: Path, rows: list, checks: list,
              rounds: int, issue_checks: bool) -> None:
    """Every runtime's fp32, slimkit int8 and own int8 files of `model`, scored and timed. `issue_checks`: the
    acceptance checks of the deployment issue (a real model: +10 points over each own quantizer, bytes <= 0.3x,
    OpenVINO int8 not slower than ONNX Runtime int8); otherwise (a toy model where every quantizer is near 100%
    and the IR's XML text outweighs the weights) slimkit must only not be worse and match its simulation."""
    example = x_eval[:1]
    with torch.no_grad():
        ref = torch.cat([model(x_eval[i:i + 32]) for i in range(0, len(x_eval), 32)])
        sim = torch.cat([q(x_eval[i:i + 32]) for i in range(0, len(x_eval), 32)])
    sim_agree = (sim.argmax(1) == ref.argmax(1)).float().mean().item()
    n = len(x_eval)
    files, found, workloads = {}, {}, {}
    for rt in RUNTIMES:
        suffix = R.SUFFIX[rt]
        t0 = time.perf_counter()
        fp32 = sk.export(model, tmp / f"{name}_fp32{suffix}", example_input=example)
        ours = sk.export(q, tmp / f"{name}_slimkit{suffix}", example_input=example)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        if rt == "ort":
            own = ort_static(tmp / f"{name}_fp32.onnx", tmp / f"{name}_own.onnx", x_cal.numpy())
        elif rt == "openvino":
            own = own_openvino(tmp / f"{name}_fp32.onnx", tmp / f"{name}_own.xml", x_cal.numpy())
        elif rt == "executorch":
            own = own_executorch(model, example, x_cal, tmp / f"{name}_own.pte")
        else:
            own = own_litert(model, example, x_cal, tmp / f"{name}_own.tflite")
        t_own = time.perf_counter() - t0
        for variant, path in (("fp32", fp32), ("slimkit int8", ours), ("own int8", own)):
            out = torch.as_tensor(np.asarray(R.runner(path)(x_eval.numpy()))).reshape(ref.shape)
            same = out.argmax(1) == ref.argmax(1)
            row = {"model": name, "runtime": rt, "variant": variant, "top1_agreement": round(same.float().mean().item(), 4),
                   "agreement_95": [round(v, 4) for v in wilson(int(same.sum()), n)], "bytes": R.file_bytes(path),
                   "bytes_vs_fp32": round(R.file_bytes(path) / R.file_bytes(fp32), 3), "eval_inputs": n,
                   "calib_inputs": len(x_cal)}
            if variant == "slimkit int8":
                row["agreement_with_simulation"] = round((out.argmax(1) == sim.argmax(1)).float().mean().item(), 4)
                row["simulation_top1_agreement"] = round(sim_agree, 4)
                row["export_s"] = round(t_ours, 1)
                row["kernels"] = R.slow_path(path)
            elif variant == "own int8":
                row["quantize_s"] = round(t_own, 1)
                row["kernels"] = R.slow_path(path)
            found[(rt, variant)] = row
            files[(rt, variant)] = path
            workloads[f"{rt}/{variant}"] = R.workload(path, example, threads=1)
        print(f"[{name}] {rt}: exported and scored", file=sys.stderr, flush=True)
    stats = compare_latency(workloads, rounds=rounds)
    base = stats["ort/fp32"]["median_ms"]
    for (rt, variant), row in found.items():
        s = stats[f"{rt}/{variant}"]
        row.update(latency_fields(s, "b1_ms"))
        row["b1_vs_ort_fp32"] = round(s["median_ms"] / base, 3)
        row["b1_vs_own_fp32"] = round(s["median_ms"] / stats[f"{rt}/fp32"]["median_ms"], 3)
        row["runtime_version"] = s.get("version")
        if "note" in s:
            row["note"] = s["note"]
        rows.append(row)
    for rt in RUNTIMES:
        ours, own = found[(rt, "slimkit int8")], found[(rt, "own int8")]
        gap = 0.10 if issue_checks else 0.0
        checks.append(check(f"{name}/{rt}: slimkit int8 agreement with fp32 >= own quantizer's + {100 * gap:.0f} points",
                            f"{ours['top1_agreement']:.4f} vs {own['top1_agreement']:.4f}", f">= +{gap:.2f}",
                            ours["top1_agreement"] >= own["top1_agreement"] + gap))
        checks.append(check(f"{name}/{rt}: slimkit int8 within 1 point of its PyTorch simulation",
                            f"{ours['top1_agreement']:.4f} vs simulation {sim_agree:.4f}", "|diff| <= 0.01",
                            abs(ours["top1_agreement"] - sim_agree) <= 0.01))
        if issue_checks:
            checks.append(check(f"{name}/{rt}: slimkit int8 bytes <= 0.3x fp32", ours["bytes_vs_fp32"], "<= 0.3",
                                ours["bytes_vs_fp32"] <= 0.3))
    if issue_checks:
        ov, ort = found[("openvino", "slimkit int8")], found[("ort", "slimkit int8")]
        ratio = stats["openvino/slimkit int8"]["median_ms"] / stats["ort/slimkit int8"]["median_ms"]
        checks.append(check(f"{name}: OpenVINO int8 batch-1 latency <= ONNX Runtime int8 (same slimkit model, interleaved)",
                            f"{ov['b1_ms']:.3f} ms vs {ort['b1_ms']:.3f} ms ({ratio:.2f}x)", "<= 1.0x", ratio <= 1.0))


def part_digits(tmp: Path, rows: list, checks: list, rounds: int) -> None:
    from slimkit.core.trainer import TrainConfig, fit

    task = sk.data.digits()
    model = fit(sk.zoo.for_task("lenet5", task, seed=0), task, TrainConfig(epochs=8, lr=2e-3), progress=False).model.eval()
    q = sk.quantize(model, QuantConfig(weights="int8", activations="uint8", calibration_samples=256, speed_check=False),
                    task=task)
    x_eval = torch.stack([task.split("test")[i][0] for i in range(len(task.split("test")))])
    x_cal = torch.stack([task.split("train")[i][0] for i in range(256)])
    run_model("lenet5-digits", model, q, x_eval, x_cal, tmp, rows, checks, rounds, issue_checks=False)


def part_effnet(tmp: Path, rows: list, checks: list, n_eval: int, n_calib: int, rounds: int) -> None:
    model = sk.zoo.efficientnet_lite0().eval()
    norm = dict(mean=sk.zoo.EFFICIENTNET_LITE_MEAN, std=sk.zoo.EFFICIENTNET_LITE_STD)
    x_eval = sk.data.natural_images(n_eval, seed=1, **norm)
    x_cal = sk.data.natural_images(n_calib, seed=2, **norm)
    # benchmarks/quantize.py's configuration (the choices and their measurements are documented there)
    cfg = QuantConfig(weights="int8", activations="uint8", calibration="percentile", bias_correction=True, gptq=True,
                      keep_float=["_conv_stem", "_blocks.0._depthwise_conv"], calibration_samples=n_calib,
                      speed_check=False)
    q = sk.quantize(model, cfg, calibration_data=x_cal)
    run_model("efficientnet_lite0", model, q, x_eval, x_cal, tmp, rows, checks, rounds, issue_checks=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="digits,effnet")
    ap.add_argument("--eval-crops", type=int, default=256)
    ap.add_argument("--calib-crops", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list = []
    checks: list = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code = run_parts({"digits": lambda: part_digits(tmp, rows, checks, args.rounds),
                          "effnet": lambda: part_effnet(tmp, rows, checks, args.eval_crops, args.calib_crops, args.rounds)},
                         args.parts.split(","), checks)
    if code:
        return code
    print_table(rows, ["model", "runtime", "variant", "top1_agreement", "agreement_with_simulation", "bytes",
                       "bytes_vs_fp32", "b1_ms", "b1_ms_p10", "b1_ms_p90", "b1_vs_ort_fp32", "b1_vs_own_fp32"], title="deploy")
    env = environment(note="shared 2-core machine; latency: batch 1, 1 thread, variants of a model interleaved; "
                      "ExecuTorch and LiteRT timed on this x86 host do not predict a phone")
    write_result(args.out, "deploy", env, rows, checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quantization benchmark: slimkit side by side with ONNX Runtime's own quantizers on the same models
and data. Prints a table, writes JSON (`--out`), exits 0 whether or not the checks pass.

    python benchmarks/quantize.py --out quantize.json [--parts cnn,lowbit,effnet,minilm]

Parts:
  cnn     digits CNNs (vgg_small, LeNet-5): static int8 accuracy, bytes, latency (ORT int8 vs ORT fp32 vs
          PyTorch eager, batch 64, 1 thread), ORT's quantize_static and torchao's PT2E x86 int8 (run in
          PyTorch on oneDNN kernels) on the same model and data.
  lowbit  LeNet-5 at 4-bit weights / 8-bit activations: round-to-nearest vs AdaRound vs QAT (LSQ).
  effnet  EfficientNet-Lite0 (ImageNet weights), natural-image crops (`--sources`: the shipped camera
          photographs, or all shipped images): top-1 agreement with fp32 (all crops and the decisive ones)
          and latency at batch 8 (interleaved rounds), slimkit vs ORT quantize_static (per-channel
          MinMax); references: int8 weights alone, bfloat16 weights.
  minilm  all-MiniLM-L6-v2 dynamic int8 (embedding tables too): cosine similarity to fp32 over real sentences,
          file bytes, batch-1 latency,
          slimkit vs ORT quantize_dynamic.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check, environment, latency_fields, print_table, run_parts, write_result  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.data.natural import SOURCES, is_grey  # noqa: E402
from slimkit.evaluate import compare_latency, ort_call, speedup, torch_call  # noqa: E402
from slimkit.export.onnx import export_onnx, run_onnx  # noqa: E402
from slimkit.quantize import QuantConfig, check_parity, export_quantized, quantize_pt2e  # noqa: E402
from slimkit.quantize.blame import format_blame  # noqa: E402
from slimkit.quantize.export import onnx_op_counts  # noqa: E402


def ort_static(fp32_path: Path, out_path: Path, calib: np.ndarray, per_channel: bool = True) -> Path:
    """ONNX Runtime's own static quantizer (QDQ, per-channel MinMax, U8S8) on the same calibration data."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def ort_predict(path: Path, x, batch: int = 64, fused: bool = True) -> torch.Tensor:
    """ONNX Runtime outputs. fused=False: graph optimizations off, so the QDQ graph runs as float ops on the
    integer codes (an exact simulation of the integers, independent of this CPU's int8 kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    if not fused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [torch.as_tensor(session.run(None, {name: x[i:i + batch].numpy()})[0]) for i in range(0, len(x), batch)]
    return torch.cat(outs)


def part_cnn(tmp: Path, rows: list, checks: list, epochs: int) -> None:
    from slimkit.core.trainer import TrainConfig, fit

    task = sk.data.digits()
    x_test = torch.stack([task.test[i][0] for i in range(len(task.test))])
    y_test = torch.stack([task.test[i][1] for i in range(len(task.test))])
    calib = torch.cat(list(task.calibration_batches(max_samples=512))).numpy()
    for name in ("vgg_small", "lenet5"):
        model = fit(sk.zoo.for_task(name, task, seed=0), task, TrainConfig(epochs=epochs, lr=2e-3), description=name).model
        q = sk.quantize(model, QuantConfig(weights="int8", activations="uint8", calibration="percentile"), task=task)
        fp32 = export_onnx(model, tmp / f"{name}_fp32.onnx", task.example_input(1))
        qpath = export_quantized(q, tmp / f"{name}_int8.onnx", task.example_input(1))
        ortq = ort_static(fp32, tmp / f"{name}_ortq.onnx", calib)
        pt2e = quantize_pt2e(model, task=task)  # torchao's PT2E flow, x86 quantizer, oneDNN int8 in PyTorch
        pt2e_path = sk.save(pt2e, tmp / f"{name}_pt2e.safetensors")
        x64 = task.example_input(64)
        # one interleaved comparison per batch size (the project's latency protocol): ratios share its rounds
        timings = {bs: compare_latency({"torch_fp32": torch_call(model, x), "torchao_pt2e_int8": torch_call(pt2e, x),
                                        "ort_fp32": ort_call(fp32, x), "slimkit_int8": ort_call(qpath, x),
                                        "ort_quantizer_int8": ort_call(ortq, x)}, rounds=7, min_runs=5)
                   for bs, x in ((1, task.example_input(1)), (64, x64))}
        timing = timings[64]
        lat = {k: v["median_ms"] for k, v in timing.items()}
        with torch.no_grad():
            acc_fp32 = (model(x_test).argmax(1) == y_test).float().mean().item()
        acc = {"fp32": acc_fp32,
               "slimkit_int8": (ort_predict(qpath, x_test).argmax(1) == y_test).float().mean().item(),
               "ort_quantizer_int8": (ort_predict(ortq, x_test).argmax(1) == y_test).float().mean().item(),
               "torchao_pt2e_int8": (pt2e(x_test).argmax(1) == y_test).float().mean().item()}
        parity = check_parity(q, qpath, x64)
        ops = onnx_op_counts(qpath)
        for variant, path in (("fp32", fp32), ("slimkit_int8", qpath), ("ort_quantizer_int8", ortq)):
            rows.append({"part": "cnn", "model": name, "variant": variant, "accuracy": acc[variant],
                         "bytes": path.stat().st_size,
                         **latency_fields(timings[1]["ort_fp32" if variant == "fp32" else variant], "ort_ms_b1_1t"),
                         **latency_fields(timing["ort_fp32" if variant == "fp32" else variant], "ort_ms_b64_1t"),
                         "speedup_vs_ort_fp32": speedup(timing["ort_fp32"], timing[variant])["speedup"]
                         if variant != "fp32" else None,
                         "torch_eager_ms_b64_1t": lat["torch_fp32"] if variant == "fp32" else None,
                         "parity_max_abs_diff": parity["max_abs_diff"] if variant == "slimkit_int8" else None,
                         "int8_kernels": ops.get("QLinearConv", 0) + ops.get("QGemm", 0) if variant == "slimkit_int8" else None})
        kernels = pt2e.kernels()
        rows.append({"part": "cnn", "model": name, "variant": "torchao_pt2e_int8", "accuracy": acc["torchao_pt2e_int8"],
                     "bytes": pt2e_path.stat().st_size, "ort_ms_b64_1t": None,
                     "torch_eager_ms_b64_1t": lat["torchao_pt2e_int8"],
                     "int8_kernels": kernels.get("onednn.qconv_pointwise.default", 0)
                     + kernels.get("onednn.qlinear_pointwise.default", 0),
                     "note": "PyTorch with oneDNN int8 kernels; file = float weights + observer statistics"})
        for bs, t in timings.items():  # never slower than float, by default (the speed check keeps float where it is)
            sp = speedup(t["ort_fp32"], t["slimkit_int8"])
            slower = sp["reliable"] and sp["speedup"] < 1
            kept = "; ".join(n for n in q.slimkit_notes if n.startswith("kept float")) or "nothing kept float"
            checks.append(check(f"cnn: {name} int8 not slower than ORT fp32 (b{bs}, 1 thread; {kept})",
                                f"{sp['speedup']:.2f}x ({sp['low']:.2f}-{sp['high']:.2f})", "not slower", not slower))
        if name == "vgg_small":  # the small CNN of the acceptance checks (LeNet-5 is too small for int8 to pay)
            drop = 100 * (acc["fp32"] - acc["slimkit_int8"])
            checks.append(check("cnn: static int8 accuracy drop (points, ORT int8, vgg_small)", round(drop, 3), "<= 0.3", drop <= 0.3))
            s1 = speedup(timing["ort_fp32"], timing["slimkit_int8"])["speedup"]
            checks.append(check("cnn: speed-up vs ORT fp32 (b64, 1 thread)", round(s1, 2), ">= 2.0", s1 >= 2.0))
            s2 = speedup(timing["torch_fp32"], timing["slimkit_int8"])["speedup"]
            checks.append(check("cnn: speed-up vs PyTorch fp32 eager (b64, 1 thread)", round(s2, 2), ">= 2.5", s2 >= 2.5))
            ratio = qpath.stat().st_size / fp32.stat().st_size
            checks.append(check("cnn: int8 file bytes / fp32 file bytes", round(ratio, 3), "<= 0.3", ratio <= 0.3))
            checks.append(check("cnn: ORT int8 vs slimkit simulation top-1 agreement", parity["top1_agreement"], "== 1.0",
                                parity["top1_agreement"] == 1.0))


def part_lowbit(tmp: Path, rows: list, checks: list, epochs: int) -> None:
    from slimkit.core.trainer import TrainConfig, accuracy, fit

    task = sk.data.digits()
    model = fit(sk.zoo.for_task("lenet5", task, seed=0), task, TrainConfig(epochs=epochs, lr=2e-3), description="lenet5").model
    base = accuracy(model, task, "test")
    common = dict(weights="int4", activations="uint8", weight_calibration="mse", calibration="percentile",
                  calibration_samples=256)
    variants = {"rtn": QuantConfig(**common), "adaround": QuantConfig(**common, adaround=True, adaround_iters=500),
                "gptq": QuantConfig(**common, gptq=True), "qat_lsq": QuantConfig(**common, qat_epochs=3, qat_lr=5e-4)}
    accs = {}
    for label, cfg in variants.items():
        t0 = time.perf_counter()
        q = sk.quantize(model, cfg, task=task)
        accs[label] = accuracy(q, task, "test")
        rows.append({"part": "lowbit", "model": "lenet5", "variant": f"W4A8 {label}", "accuracy": accs[label],
                     "fp32_accuracy": base, "seconds": round(time.perf_counter() - t0, 1), "simulated": True})
    for label in ("adaround", "gptq", "qat_lsq"):
        drop = 100 * (base - accs[label])
        checks.append(check(f"lowbit: W4A8 {label} accuracy drop (points; RTN drop {100 * (base - accs['rtn']):.2f})",
                            round(drop, 3), "<= 1.0", drop <= 1.0))


def part_effnet(tmp: Path, rows: list, checks: list, n_eval: int, n_calib: int, rounds: int = 5,
                sources: str = "photographs") -> None:
    model = sk.zoo.efficientnet_lite0()
    norm = dict(mean=sk.zoo.EFFICIENTNET_LITE_MEAN, std=sk.zoo.EFFICIENTNET_LITE_STD)  # the model's own, (x-127)/128
    x_eval = sk.data.natural_images(n_eval, seed=1, sources=sources, **norm)
    # which photograph each test crop comes from: agreement is also reported on the colour photographs' crops
    # and on the grey-level ones' (stacked to RGB), where an ImageNet model is less at home (information only)
    grey = torch.tensor([is_grey(name) for name in sk.data.natural_image_sources(n_eval, seed=1, sources=sources)])
    # a different seed: disjoint crops for calibration
    x_cal = sk.data.natural_images(n_calib, seed=2, sources=sources, **norm)
    # information only: the same seed's crops of every shipped image (drawings, scans, microscopy and
    # telescope images too: the set used until session 11), scored with the same models
    x_all = sk.data.natural_images(n_eval, seed=1, sources="all", **norm) if sources != "all" else None

    @torch.no_grad()
    def torch_predict(m, x=None):  # PyTorch outputs over the evaluation crops, in batches of 32
        x = x_eval if x is None else x
        return torch.cat([m(x[i:i + 32]) for i in range(0, len(x), 32)])

    ref = torch_predict(model)
    ref_all = torch_predict(model, x_all) if x_all is not None else None

    def agreement_all(predict) -> dict:  # predict(x) -> outputs; scored on x_all when there is one
        if x_all is None:
            return {}
        return {"top1_agreement_all_sources": round((predict(x_all).argmax(1) == ref_all.argmax(1)).float().mean().item(), 4)}
    # kept in float: the two layers a per-layer sensitivity scan ranked most sensitive (keeping three more
    # float, chosen on validation crops, did not raise test agreement and cost a third of the speed-up)
    keep = ["_conv_stem", "_blocks.0._depthwise_conv"]
    # activation thresholds: percentile and MSE tie on validation crops (512, seed 11, disjoint from these;
    # PyTorch simulation): agreement 0.945 vs 0.941, output SQNR 24.0 dB both; min-max 0.940 (20.8 dB);
    # keeping the head conv and classifier float too changes nothing (0.945); KL 0.871 / 16.8 dB (session 7)
    # AdaRound (8-bit) on the three most sensitive quantized layers was tried (session 7): validation
    # agreement 0.945 -> 0.951 at equal output SQNR (24.0 / 24.1 dB), test (ONNX Runtime) 0.949 -> 0.945:
    # noise, not adopted (results/quantize-effnet-adaround.json)
    # GPTQ rounding (session 8), validation crops: 0.943 -> 0.959 agreement, 24.0 -> 24.9 dB output SQNR
    # session 9, validation crops with GPTQ: 1,024 calibration crops 24.6 dB, MSE thresholds 24.85 dB,
    # percentile 99.999 25.0 dB, 99.9 15.6 dB (agreement 0.936-0.959 at equal SQNR: near-ties). int16 for the
    # block-0/1 activations `blame` ranks worst: +0.7 dB (one) to +1.9 dB (five), but ONNX Runtime has no int16
    # convolution on CPU and runs their consumers in float: 1.76x / 1.05x of fp32's speed; not adopted
    # session 13: calibrated on crops of seeds 2-6 instead, this config agrees 0.943-0.954 on these test crops
    # (ONNX Runtime, mean 0.950): the agreement is decided by near-ties, seed 2 has been the draw since session 4
    # blame: which activations and which layers' weights the remaining error comes from (leave-one-out on
    # the first calibration batch, 64 crops; the model is left as it was)
    # target "portable" (the default, the check): 7-bit weight grid, right on AVX2-only CPUs too;
    # "x86-vnni" beside it: the full 8-bit grid, what the earlier sessions measured (wrong on AVX2-only CPUs)
    cfg = QuantConfig(weights="int8", activations="uint8", calibration="percentile", bias_correction=True,
                      gptq=True, keep_float=keep, calibration_samples=n_calib, blame=True)
    q = sk.quantize(model, cfg, calibration_data=x_cal)
    blamed = q.slimkit_blame
    print("\n".join(format_blame(blamed, top=8)))
    q_vnni = sk.quantize(model, QuantConfig(**{**cfg.to_dict(), "blame": False, "target": "x86-vnni"}),
                         calibration_data=x_cal)
    fp32 = export_onnx(model, tmp / "effnet_fp32.onnx", x_eval[:1])
    qpath = export_quantized(q, tmp / "effnet_int8.onnx", x_eval[:1])
    vnni_path = export_quantized(q_vnni, tmp / "effnet_int8_vnni.onnx", x_eval[:1])
    ortq = ort_static(fp32, tmp / "effnet_ortq.onnx", x_cal.numpy())
    x8 = x_eval[:8]
    # crops where fp32 itself hardly decides (top-2 probabilities within 0.05) flip under any perturbation
    top2 = ref.softmax(1).topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= 0.05

    def agreement(out):
        same = out.argmax(1) == ref.argmax(1)
        return same.float().mean().item(), same[decisive].float().mean().item()

    def spread(out) -> dict:  # how precisely the crops measure agreement; the first 256: the size sessions 8-9 used
        same = (out.argmax(1) == ref.argmax(1)).float()
        return {"top1_agreement_ci95": wilson(int(same.sum()), len(same)),
                "top1_agreement_first256": round(same[:256].mean().item(), 4),
                "top1_agreement_colour_photos": round(same[~grey].mean().item(), 4), "colour_crops": int((~grey).sum()),
                "top1_agreement_grey_photos": round(same[grey].mean().item(), 4)}

    files = {"fp32": fp32, "slimkit_int8": qpath, "slimkit_int8_x86_vnni": vnni_path, "ort_quantizer_int8": ortq}
    targets = {"slimkit_int8": "portable", "slimkit_int8_x86_vnni": "x86-vnni"}
    # one interleaved comparison (the project's latency protocol): the speed-ups below share its rounds
    timing = compare_latency({v: ort_call(p, x8) for v, p in files.items()}, rounds=rounds, min_runs=8)
    for variant, path in files.items():
        out = ort_predict(path, x_eval, batch=32)
        agree, agree_decisive = agreement(out)
        # the same file with ONNX Runtime's fusions off: float ops on the integer codes, no int8 kernel involved
        unfused = agreement(ort_predict(path, x_eval, batch=32, fused=False))[0] if variant != "fp32" else None
        rows.append({"part": "effnet", "model": "efficientnet_lite0", "variant": variant, "top1_agreement": agree,
                     "top1_agreement_unfused": unfused, "target": targets.get(variant),
                     **spread(out), "top1_agreement_decisive": agree_decisive, "decisive_crops": int(decisive.sum()),
                     **agreement_all(lambda x, p=path: ort_predict(p, x, batch=32)),
                     "bytes": path.stat().st_size, **latency_fields(timing[variant], "ort_ms_b8_1t"),
                     "speedup_vs_ort_fp32": speedup(timing["fp32"], timing[variant])["speedup"], "latency_rounds": rounds,
                     "eval_crops": n_eval, "calib_crops": n_calib, "sources": sources}
                    | ({"blame": {k: v if k != "rows" else v[:12] for k, v in blamed.items()}}
                       if variant == "slimkit_int8" else {}))
    # reference point, not a deployable variant: int8 weights alone (activations float), PyTorch simulation
    def reference_row(variant: str, m, note: str) -> dict:
        out = torch_predict(m)
        agree, agree_decisive = agreement(out)
        return {"part": "effnet", "model": "efficientnet_lite0", "variant": variant, "top1_agreement": agree,
                **spread(out), "top1_agreement_decisive": agree_decisive, "decisive_crops": int(decisive.sum()),
                **agreement_all(lambda x: torch_predict(m, x)),
                "eval_crops": n_eval, "sources": sources, "note": note}

    wq = sk.quantize(model, QuantConfig(weights="int8", activations="none", mode="weight_only"))
    rows.append(reference_row("weight_only_int8_simulated", wq,
                              "PyTorch simulation; activations float: the agreement int8 weights alone allow"))
    # noise floor, not a quantizer: every weight rounded to bfloat16 (8 significant bits), computed in fp32
    bf = copy.deepcopy(model)
    with torch.no_grad():
        for p in bf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    rows.append(reference_row("bf16_weights_reference", bf,
                              "weights rounded to bfloat16, PyTorch fp32 compute: how fragile top-1 is on these crops"))
    r = {row["variant"]: row for row in rows if row["part"] == "effnet"}
    a = r["slimkit_int8"]["top1_agreement"]
    lo, hi = r["slimkit_int8"]["top1_agreement_ci95"]
    on_all = (f"; on the same seed's crops of all shipped images (drawings, scans, microscopy too): slimkit "
              f"{r['slimkit_int8']['top1_agreement_all_sources']:.4f}, ORT quantizer "
              f"{r['ort_quantizer_int8']['top1_agreement_all_sources']:.4f}, bfloat16 weights "
              f"{r['bf16_weights_reference']['top1_agreement_all_sources']:.4f}") if x_all is not None else ""
    checks.append(check(f"effnet: static int8 top-1 agreement with fp32 over {n_eval} crops of {sources} (95% interval "
                        f"{lo:.4f}-{hi:.4f}; first 256 crops {r['slimkit_int8']['top1_agreement_first256']:.4f}; crops of colour "
                        f"photographs {r['slimkit_int8']['top1_agreement_colour_photos']:.4f}, ORT quantizer there "
                        f"{r['ort_quantizer_int8']['top1_agreement_colour_photos']:.4f}; ORT quantizer: "
                        f"{r['ort_quantizer_int8']['top1_agreement']:.4f}; int8 weights alone: "
                        f"{r['weight_only_int8_simulated']['top1_agreement']:.4f}; weights rounded to bfloat16: "
                        f"{r['bf16_weights_reference']['top1_agreement']:.4f}; on the {int(decisive.sum())} crops "
                        f"where fp32's top-2 margin >= 0.05: slimkit {r['slimkit_int8']['top1_agreement_decisive']:.4f}{on_all})",
                        round(a, 4), ">= 0.95", a >= 0.95))
    gap = abs(a - r["slimkit_int8"]["top1_agreement_unfused"])
    checks.append(check(f"effnet: |agreement with ONNX Runtime's int8 kernels on this CPU - the same file unfused| "
                        f"(target portable; x86-vnni file: {r['slimkit_int8_x86_vnni']['top1_agreement']:.4f} fused, "
                        f"{r['slimkit_int8_x86_vnni']['top1_agreement_unfused']:.4f} unfused)", round(gap, 4),
                        "<= 0.01", gap <= 0.01))
    s = r["slimkit_int8"]["speedup_vs_ort_fp32"]  # median of the per-round ratios
    checks.append(check("effnet: speed-up vs ORT fp32 (b8, 1 thread)", round(s, 2), ">= 1.8", s >= 1.8))


def sentences(n: int) -> list[str]:
    """Real English sentences from documentation shipped in installed packages (no download)."""
    import re

    import sklearn

    texts = []
    for f in sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst")):
        texts.append(f.read_text(errors="ignore"))
    # package descriptions (README text in each installed distribution's METADATA)
    site = Path(sklearn.__file__).parent.parent
    for f in sorted(site.glob("*.dist-info/METADATA")):
        body = f.read_text(errors="ignore").split("\n\n", 1)
        if len(body) == 2:
            texts.append(re.sub(r"\(?https?://\S+", " ", body[1]))
    out, seen = [], set()
    for text in texts:
        text = re.sub(r"[`*:|=\-_#]+", " ", text)
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 30 <= len(s) <= 300 and s not in seen and sum(c.isalpha() for c in s) > 0.6 * len(s):
                seen.add(s)
                out.append(s)
    return out[:n]


def part_minilm(tmp: Path, rows: list, checks: list, n: int) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slimkit.zoo.pretrained import minilm_tokenizer

    model = sk.zoo.minilm()
    tok = minilm_tokenizer()
    sents = sentences(n)
    enc = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ref = torch.cat([model(ids[i:i + 32], mask[i:i + 32]) for i in range(0, len(sents), 32)])
    q = sk.quantize(model, QuantConfig(weights="int8", activations="uint8", mode="dynamic"))
    # one padded length for every sentence (masked mean pooling makes padding exact), batch axis dynamic
    ex1 = (ids[:1], mask[:1])
    fp32 = export_onnx(model, tmp / "minilm_fp32.onnx", ex1)
    qpath = export_quantized(q, tmp / "minilm_int8.onnx", ex1)
    # int4 weight-only Linear layers (blocks of 32 along the input, one scale each): ORT MatMulNBits
    q4 = sk.quantize(model, QuantConfig(weights="int4", activations="none", mode="weight_only", group_size=32))
    q4path = export_quantized(q4, tmp / "minilm_int4.onnx", ex1)
    # the same int4 layout, rounded by GPTQ on 128 other sentences (calibration, disjoint from the evaluation)
    cal = sentences(n + 128)[n:]
    cal_enc = tok(cal, padding=True, truncation=True, max_length=128, return_tensors="pt")
    cal_batches = [(cal_enc["input_ids"][i:i + 32], cal_enc["attention_mask"][i:i + 32]) for i in range(0, len(cal), 32)]
    q4g = sk.quantize(model, QuantConfig(weights="int4", activations="none", mode="weight_only", group_size=32, gptq=True),
                      calibration_data=cal_batches)
    q4gpath = export_quantized(q4g, tmp / "minilm_int4_gptq.onnx", ex1)
    ortq = tmp / "minilm_ortq.onnx"
    quantize_dynamic(str(fp32), str(ortq), weight_type=QuantType.QInt8, per_channel=True)
    for variant, path in (("fp32", fp32), ("slimkit_dynamic_int8", qpath), ("ort_quantizer_dynamic_int8", ortq),
                          ("slimkit_int4_weight_only_matmulnbits", q4path),
                          ("slimkit_int4_weight_only_gptq_matmulnbits", q4gpath)):
        emb = torch.cat([torch.as_tensor(run_onnx(path, (ids[i:i + 16], mask[i:i + 16]), threads=2))
                         for i in range(0, len(sents), 16)])
        cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
        rows.append({"part": "minilm", "model": "all-MiniLM-L6-v2", "variant": variant, "sentences": len(sents),
                     "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
                     "bytes": path.stat().st_size, "path": path})
    # one interleaved comparison of every variant (the project's latency protocol)
    minilm_rows = [row for row in rows if row["part"] == "minilm"]
    timing = compare_latency({row["variant"]: ort_call(row["path"], ex1) for row in minilm_rows}, rounds=7, min_runs=5)
    for row in minilm_rows:
        row.update(latency_fields(timing[row["variant"]], "ort_ms_b1_1t"),
                   speedup_vs_ort_fp32=speedup(timing["fp32"], timing[row["variant"]])["speedup"])
        del row["path"]
    r = {row["variant"]: row for row in rows if row["part"] == "minilm"}
    s = r["slimkit_dynamic_int8"]
    checks.append(check("minilm: dynamic int8 cosine mean", round(s["cosine_mean"], 4), ">= 0.99", s["cosine_mean"] >= 0.99))
    checks.append(check("minilm: dynamic int8 cosine min", round(s["cosine_min"], 4), ">= 0.98", s["cosine_min"] >= 0.98))
    sp = s["speedup_vs_ort_fp32"]
    checks.append(check("minilm: speed-up vs ORT fp32 (b1, 1 thread)", round(sp, 2), ">= 1.8", sp >= 1.8))
    checks.append(check("minilm: sentences", s["sentences"], ">= 200", s["sentences"] >= 200))
    ratio = s["bytes"] / r["fp32"]["bytes"]
    checks.append(check("minilm: dynamic int8 file vs fp32", round(ratio, 4), "<= 0.26", ratio <= 0.26))
    ortq_bytes = r["ort_quantizer_dynamic_int8"]["bytes"]
    checks.append(check("minilm: dynamic int8 file vs ORT quantize_dynamic's", round(s["bytes"] / ortq_bytes, 4), "<= 1",
                        s["bytes"] <= ortq_bytes))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="cnn,lowbit,effnet,minilm")
    ap.add_argument("--epochs", type=int, default=5)
    # 1,024 test crops (seed 1; until session 10 the first 256 were sessions 8-9's set, drawn from a list that held
    # one photograph twice): at 256 the agreement's 95% interval is
    # +-2.7 points, wider than the gap the 0.95 check judges (sessions 8-9 measured 0.9492 there)
    ap.add_argument("--eval-crops", type=int, default=1024)
    ap.add_argument("--calib-crops", type=int, default=256)
    # effnet: crops of the shipped camera photographs (the check), with the same seed's crops of every shipped
    # image (drawings, scans, microscopy: the set until session 11) scored beside them; "all" checks on those
    ap.add_argument("--sources", choices=SOURCES, default="photographs")
    ap.add_argument("--sentences", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list = []
    checks: list = []
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code = run_parts({"cnn": lambda: part_cnn(tmp, rows, checks, args.epochs),
                          "lowbit": lambda: part_lowbit(tmp, rows, checks, args.epochs),
                          "effnet": lambda: part_effnet(tmp, rows, checks, args.eval_crops, args.calib_crops,
                                                        sources=args.sources),
                          "minilm": lambda: part_minilm(tmp, rows, checks, args.sentences)}, parts, checks)
    if code:
        return code
    # the blame table is printed as lines by its part (too wide for a cell); it stays in the JSON
    print_table(rows, sorted({k for r in rows for k in r if k != "blame"}, key=lambda k: (k not in ("part", "model", "variant"), k)),
                title="quantize")
    env = environment(note="shared 2-core machine with other jobs running; compare ratios within this run")
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    write_result(args.out, "quantize", env, rows, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

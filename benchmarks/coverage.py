"""Coverage: every technique on the architectures users bring, beside the peers, through the one contract.

    python benchmarks/coverage.py --out benchmarks/results/coverage.json [--sets torchvision,timm,hf]
        [--models GLOB] [--techniques a,b] [--cap 120] [--size 64] [--max-params 30e6] [--budget 60m]

Models: every torchvision classification model (`torchvision.models.list_models(module=torchvision.models)`),
one member each of the timm families in `TIMM` and the Hugging Face configs in `HF` (encoder, decoder and a
Llama-style config), random weights, never downloaded. Images are `--size` pixels square (a model that
cannot run at that size is run at 224); ResNet-50 always runs at 224 (the issue's timing bounds).

Each model's techniques run in a worker process, one at a time, through `slimkit.core.contract.check` with
`contract.quick_configs()` (no recovery training; NAS is left out: it searches its own space instead of
transforming the model). A technique that runs past `--cap` seconds is a timeout: the worker is killed and a
new one goes on with the next technique, so a hang or a crash costs only its own row. Outcomes: ok, skip (a
typed refusal with its reason), fail (an exception that is not a typed refusal, or a broken contract) and
timeout. Peers on the same model: ONNX Runtime `quantize_static` (QDQ, MinMax, per-channel) on the fp32 ONNX
export, and Torch-Pruning's MetaPruner at 50% channels. For int8 rows, `int8_share` is the fraction of the
conv/linear nodes (those with a weight tensor) ONNX Runtime runs on integer kernels after its fusions (a node
count, not MACs; attention's activation x activation matmuls are not counted).
`extra_memory_x_model`: the process's peak resident memory during the row (technique and the contract's
save/reload checks) above what it held before, over the fp32 model's bytes (Linux VmHWM, reset per row).

`--budget` stops starting new models once that much time has passed (ResNet-50 first, then the smallest
models first); models not reached are listed. Rows and checks go to the JSON; the table prints per model and per technique.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check, environment, print_table, write_result  # noqa: E402

TIMM = ["resnet18", "resnet50d", "mobilenetv3_small_050", "mobilenetv4_conv_small", "efficientnet_b0", "lcnet_050",
        "ghostnet_100", "regnetx_002", "rexnet_100", "mixnet_s", "tinynet_e", "densenet121", "dla34", "repvgg_a0",
        "cspresnet50", "convnext_atto", "edgenext_xx_small", "deit_tiny_patch16_224", "vit_tiny_patch16_224",
        "swin_tiny_patch4_window7_224", "levit_128s", "fastvit_t8", "mobilevit_xxs", "efficientformer_l1",
        "mobileone_s0", "hrnet_w18_small"]
HF = {
    "bert": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                 head="classifier", num_labels=2),
    "distilbert": dict(dim=128, n_layers=2, n_heads=4, hidden_dim=512, head="classifier", num_labels=2),
    "gpt2": dict(n_embd=128, n_layer=2, n_head=4, head="causal-lm"),
    "llama": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head="causal-lm"),
}
TECHNIQUES = ["prune", "pack", "prune_structured", "prune_heads", "factorize", "separable", "distill", "quantize",
              "quantize_pt2e"]
PEERS = ["ort_quantize_static", "torch_pruning_50"]
# typed refusals that mean "this technique has nothing to do on this model", not "cannot handle it"
NOT_APPLICABLE = ("no BERT-style attention", "matched no layer", "needs class logits", "has no Conv or Linear")
INT8_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QAttention"}
FLOAT_OPS = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "NhwcFusedConv"}


def int8_share(path) -> float | None:
    """Of the conv/linear nodes (a weight tensor among their inputs) ONNX Runtime runs after its fusions, the
    fraction on integer kernels. Attention's activation x activation matmuls are not counted (no weights)."""
    from slimkit.quantize.export import optimized_graph

    graph = optimized_graph(path)
    weights = {t.name for t in graph.initializer}
    int8 = sum(n.op_type in INT8_OPS for n in graph.node)
    fp = sum(n.op_type in FLOAT_OPS and any(i in weights for i in n.input) for n in graph.node)
    return int8 / (int8 + fp) if int8 + fp else None


def catalog(sets: list[str]) -> list[dict]:
    """(name, kind, build kwargs) of every model to run."""
    import slimkit.core  # noqa: F401 - makes torchvision importable beside the CPU torch

    out = []
    if "torchvision" in sets:
        import torchvision

        out += [{"model": f"torchvision:{n}", "kwargs": {"num_classes": 10}}
                for n in torchvision.models.list_models(module=torchvision.models)]
    if "timm" in sets:
        out += [{"model": f"timm:{n}", "kwargs": {"num_classes": 10}} for n in TIMM]
    if "hf" in sets:
        out += [{"model": f"hf:{n}", "kwargs": {"vocab_size": 1000, **cfg}} for n, cfg in HF.items()]
    return out


def _task(model, spec, size):
    import torch

    from slimkit.core.task import tensor_task

    g = torch.Generator().manual_seed(0)
    if spec["model"].startswith("hf:"):
        x, classes, shape = torch.randint(1, 1000, (48, 16), generator=g), 2, (16,)
    else:
        classes = 10
        sizes = [224] if spec["model"] == "torchvision:resnet50" else [size, 224]
        for s in dict.fromkeys(sizes):
            shape = (3, s, s)
            try:
                with torch.no_grad():
                    model.eval()(torch.randn(2, *shape))
                break
            except Exception:  # noqa: BLE001 - a model with a fixed input size: the next size
                continue
        x = torch.randn(48, *shape, generator=g)
    y = torch.arange(48) % classes
    return tensor_task("random", x[:32], y[:32], x[32:], y[32:], num_classes=classes, input_shape=shape, batch_size=16)


def _peer(name, model, task, directory):
    import copy

    import torch

    from slimkit.evaluate.metrics import count_macs

    one = task.example_input(1)
    if name == "ort_quantize_static":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        from slimkit.export.onnx import export_onnx

        fp32 = export_onnx(model, Path(directory) / "fp32.onnx", one)
        data = [{"input": b.numpy()} for b in task.calibration_batches(batch_size=1, max_samples=16)]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(data)

            def get_next(self):
                return next(self.it, None)

        out = Path(directory) / "ort-int8.onnx"
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        return {"bytes_ratio": out.stat().st_size / fp32.stat().st_size, "int8_share": int8_share(out)}
    if name == "torch_pruning_50":
        import torch_pruning as tp

        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            shape = m(one).shape
        layers = [x for x in m.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))]
        base = count_macs(m, one)
        pruner = tp.pruner.MetaPruner(m, one, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=layers[-1:])
        pruner.step()
        with torch.no_grad():
            if m(one).shape != shape:
                raise RuntimeError("wrong output shape")
        return {"macs_ratio": count_macs(m, one) / base}
    raise ValueError(name)


def _memory_kb(field: str) -> int | None:
    """VmRSS / VmHWM (peak) of this process in kB (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _worker(spec, todo, size, queue):
    """Run `todo` (technique / peer names) on one model, one JSON result per item on `queue`."""
    os.environ.setdefault("SLIMKIT_PROGRESS", "0")
    import torch

    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "1")))
    import slimkit as sk
    from slimkit.core.contract import check as contract_check
    from slimkit.core.contract import quick_configs

    configs = quick_configs()
    model = sk.zoo.external(spec["model"], **spec["kwargs"]).eval()
    task = _task(model, spec, size)
    params = sum(p.numel() for p in model.parameters())
    for name in todo:
        queue.put({"start": name})
        row = {"model": spec["model"], "technique": name, "params": params, "input": list(task.input_shape)}
        t0 = time.perf_counter()
        _reset_peak()
        rss = _memory_kb("VmRSS")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if name in PEERS:
                    row.update(status="ok", **_peer(name, model, task, tmp))
                else:
                    outcome = contract_check(model, configs[name], task, tmp)
                    row.update(status=outcome.status, reason=outcome.reason[:300], seconds_apply=round(outcome.seconds, 2),
                               macs_ratio=outcome.macs_ratio, params_ratio=outcome.params_ratio)
                    if outcome.status == "ok" and outcome.artifact_bytes and outcome.reference_bytes:
                        row["bytes_ratio"] = outcome.artifact_bytes / outcome.reference_bytes
                    if outcome.status == "ok" and outcome.artifact and outcome.artifact.endswith(".onnx"):
                        row["int8_share"] = int8_share(outcome.artifact)
                    if outcome.status == "skip" and any(p in outcome.reason for p in NOT_APPLICABLE):
                        row["status"] = "n/a"
            except Exception as err:  # noqa: BLE001 - a crash or a broken contract is this row's finding
                row.update(status="fail", reason=f"{type(err).__name__}: {str(err)[:300]}",
                           where=traceback.format_exc().strip().splitlines()[-3][:200])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        peak = _memory_kb("VmHWM")
        if rss is not None and peak is not None:  # what the technique (and the contract's checks) added at peak
            row["extra_memory_x_model"] = round((peak - rss) * 1024 / (4 * params), 2)
        queue.put(row)


def run_model(spec, todo, size, cap) -> list[dict]:
    """Run one model's items in worker processes; a timeout or a dead worker costs its own row, and the rest
    go on in a new worker."""
    import queue as queues

    ctx = mp.get_context("spawn")
    rows, todo = [], list(todo)
    while todo:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(spec, todo, size, queue), daemon=True)
        proc.start()
        current, deadline = None, time.monotonic() + cap + 120  # (importing and building the model: 120 s more)
        while todo:
            try:
                msg = queue.get(timeout=1.0)
            except queues.Empty:
                if proc.is_alive() and time.monotonic() < deadline:
                    continue
                dead = not proc.is_alive()
                proc.kill()
                name = current or todo[0]
                rows.append({"model": spec["model"], "technique": name, "status": "fail" if dead else "timeout",
                             "reason": f"worker died (exit {proc.exitcode})" if dead else f"over {cap:.0f} s",
                             "seconds": cap if not dead else 0.0})
                todo.remove(name)
                print(f"  {spec['model']:<40} {name:<20} {rows[-1]['status']:<7} {rows[-1]['reason']}", flush=True)
                break
            if "start" in msg:
                current, deadline = msg["start"], time.monotonic() + cap
                continue
            rows.append(msg)
            todo.remove(msg["technique"])
            current = None
            print(f"  {msg['model']:<40} {msg['technique']:<20} {msg['status']:<7} {msg['seconds']:7.1f}s "
                  f"{msg.get('reason', '')[:90]}", flush=True)
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    return rows


SHORT = {"prune_structured": "structured", "prune_heads": "heads", "quantize_pt2e": "pt2e",
         "ort_quantize_static": "ort_int8", "torch_pruning_50": "tp_50"}


def pivot(rows: list[dict]) -> list[dict]:
    """One row per model: its size, input and each technique's status (the int8 share for quantize)."""
    out: dict[str, dict] = {}
    for r in rows:
        row = out.setdefault(r["model"], {"model": r["model"], "params_M": round(r.get("params", 0) / 1e6, 2),
                                          "input": "x".join(map(str, r.get("input", [])))})
        status = r["status"]
        if r["technique"] in ("quantize", "ort_quantize_static") and r.get("int8_share") is not None:
            status += f" {r['int8_share']:.2f}"
        row[SHORT.get(r["technique"], r["technique"])] = status
    return list(out.values())


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    per, checks = [], []
    for name in TECHNIQUES + PEERS:
        mine = [r for r in rows if r["technique"] == name]
        if not mine:
            continue
        counts = {s: sum(r["status"] == s for r in mine) for s in ("ok", "skip", "n/a", "fail", "timeout")}
        applicable = len(mine) - counts["n/a"]
        per.append({"technique": name, "models": len(mine), **counts,
                    "ok_of_applicable": round(counts["ok"] / applicable, 3) if applicable else None})
        if name in TECHNIQUES and applicable:
            checks.append(check(f"{name}: ok on >= 95% of the applicable models", f"{counts['ok']}/{applicable}",
                                ">= 0.95, rest typed skips", counts["ok"] >= 0.95 * applicable))
            checks.append(check(f"{name}: no crash, no timeout", counts["fail"] + counts["timeout"], "0",
                                counts["fail"] + counts["timeout"] == 0))
    ours = {r["model"] for r in rows if r["technique"] == "prune_structured" and r["status"] == "ok"}
    theirs = {r["model"] for r in rows if r["technique"] == "torch_pruning_50" and r["status"] == "ok"}
    if any(r["technique"] == "torch_pruning_50" for r in rows):
        checks.append(check("structured pruning ok on >= 15 more models than Torch-Pruning", f"{len(ours)} vs {len(theirs)}",
                            ">= +15", len(ours) >= len(theirs) + 15))
    cnn_int8 = [r for r in rows if r["technique"] == "quantize" and r["status"] == "ok" and not r["model"].startswith("hf:")
                and r.get("int8_share") is not None]
    if cnn_int8:
        low = [f"{r['model']} {r['int8_share']:.2f}" for r in cnn_int8 if r["int8_share"] < 0.9]
        checks.append(check("int8: >= 90% of conv/linear nodes on int8 kernels for every vision model",
                            f"{len(cnn_int8) - len(low)}/{len(cnn_int8)}" + (f"; below: {', '.join(low[:8])}" if low else ""),
                            "all", not low))
    r50 = [r for r in rows if r["model"] == "torchvision:resnet50" and r["technique"] in TECHNIQUES]
    if r50 and all("extra_memory_x_model" in r for r in r50 if r["status"] == "ok"):
        big = [f"{r['technique']} {r['extra_memory_x_model']}x" for r in r50
               if r["status"] == "ok" and r["extra_memory_x_model"] >= 3]
        checks.append(check("ResNet-50: peak memory a technique adds < 3x the fp32 model", ", ".join(big) or "all < 3x",
                            "< 3x", not big))
    if r50:
        slow = [f"{r['technique']} {r.get('seconds_apply', r['seconds'])}s" for r in r50
                if r["status"] in ("ok", "timeout") and (r.get("seconds_apply") or r["seconds"]) >= 60]
        checks.append(check("ResNet-50 (224x224): every technique applies in < 60 s", ", ".join(slow) or "all < 60 s",
                            "< 60 s", not slow))
    return per, checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/coverage.json")
    p.add_argument("--sets", default="torchvision,timm,hf")
    p.add_argument("--models", default="*", help="glob over model references, e.g. 'torchvision:resnet*'")
    p.add_argument("--techniques", default=",".join(TECHNIQUES + PEERS))
    p.add_argument("--cap", type=float, default=120.0, help="seconds per technique on one model")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--max-params", type=float, default=30e6)
    p.add_argument("--budget", default="0", help="stop starting models after this long (e.g. 60m; 0: no limit)")
    p.add_argument("--rows-from", help="recompute the tables and checks from this JSON's rows instead of running")
    args = p.parse_args(argv)
    if args.rows_from:
        saved = json.loads(Path(args.rows_from).read_text())
        rows = saved.get("details") or [r for r in saved["rows"] if "technique" in r and "model" in r and "status" in r]
        per, checks = summarize(rows)
        write_result(args.out, "coverage", saved["environment"], [{"part": "per technique", **r} for r in per] +
                     [{"part": "per model", **r} for r in pivot(rows)], checks, details=rows)
        return 0
    budget = float(args.budget[:-1]) * 60 if args.budget.endswith("m") else float(args.budget)
    todo = [t for t in args.techniques.split(",") if t]
    unknown = [t for t in todo if t not in TECHNIQUES + PEERS]
    if unknown:
        print(f"unknown technique {unknown[0]!r}; known: {', '.join(TECHNIQUES + PEERS)}", file=sys.stderr)
        return 2
    specs = [s for s in catalog(args.sets.split(",")) if fnmatch.fnmatchcase(s["model"], args.models)]
    import slimkit as sk

    sized = []
    for s in specs:  # parameter counts to order by size and to cap (building a random model is cheap)
        try:
            sized.append((sum(q.numel() for q in sk.zoo.external(s["model"], **s["kwargs"]).parameters()), s))
        except Exception as err:  # noqa: BLE001
            sized.append((0, {**s, "error": f"{type(err).__name__}: {err}"}))
    sized.sort(key=lambda t: (t[1]["model"] != "torchvision:resnet50", t[0]))  # the timing bounds' model first
    rows, skipped, t0 = [], [], time.monotonic()
    for params, spec in sized:
        if "error" in spec:
            rows += [{"model": spec["model"], "technique": t, "status": "fail", "reason": spec["error"][:300], "seconds": 0}
                     for t in todo]
            continue
        if params > args.max_params:
            skipped.append(f"{spec['model']} ({params / 1e6:.0f}M params > --max-params)")
            continue
        if budget and time.monotonic() - t0 > budget:
            skipped.append(f"{spec['model']} (not reached within --budget)")
            continue
        print(f"{spec['model']} ({params / 1e6:.1f}M params)", flush=True)
        rows += run_model(spec, todo, args.size, args.cap)
    per, checks = summarize(rows)
    models = pivot(rows)
    print_table(models, title="per model (status of each technique)")
    print_table(per, title="per technique")
    env = environment(threads=int(os.environ.get("COVERAGE_THREADS", "1")), cap_s=args.cap, size=args.size,
                      not_run=skipped, minutes=round((time.monotonic() - t0) / 60, 1))
    write_result(args.out, "coverage", env, [{"part": "per technique", **r} for r in per] +
                 [{"part": "per model", **r} for r in models], checks, details=rows)
    if skipped:
        print(f"not run: {len(skipped)} models: " + "; ".join(skipped[:20]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

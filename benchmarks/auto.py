"""Advisor and preset recipes on digits or another data set (issues: recipes, pipeline, advisor; 26).

    python benchmarks/auto.py --out benchmarks/results/auto.json [--trials 16] [--presets int8,max-compression,...]
        [--data glyphs:10000] [--time-budget 10m]

1. `slimkit auto` on LeNet-5 trained on digits with a 0.5-point accuracy budget: is the recommended
   model >= 10x smaller on disk and >= 2x faster in ONNX Runtime (batch 64, 1 thread) than fp32, within
   the budget on the test split, in under 15 minutes? (On more than `AutoConfig.screen_images` training
   images the search runs on a subset and the recommendation is rebuilt on all of them; with
   --time-budget, is the advisor itself within it?)
2. Every preset in recipes/ on the digits zoo model it targets: accuracy, bytes, latency per stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import check, environment, print_table, write_result  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.errors import InfeasibleError  # noqa: E402
from slimkit.core.trainer import TrainConfig, fit  # noqa: E402
from slimkit.pipeline.advisor import AutoConfig, advise, describe, describe_student  # noqa: E402
from slimkit.pipeline.demo import DEMO_TRAIN  # noqa: E402

PRESETS = {"int8": "vgg_small", "max-compression": "lenet5", "mobile-speed": "vgg_small",
           "transformer-dynamic-int8": "lenet300_100"}


def latency(metrics: dict, runtime: str, batch: int) -> float | None:
    return next((r["median_ms"] for r in metrics["latency"] if r["runtime"].startswith(runtime) and r["batch_size"] == batch), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trials", type=int, default=AutoConfig().trials)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--epochs", type=int, default=30, help="baseline training epochs")
    parser.add_argument("--data", default="digits", help="digits | glyphs[:N_TRAIN] | mnist:DIR ...")
    parser.add_argument("--time-budget", default=None, help="the advisor's --time-budget (e.g. 10m)")
    args = parser.parse_args()
    from slimkit.pipeline.cli import parse_duration

    budget_s = parse_duration(args.time_budget) if args.time_budget else None
    task = sk.data.resolve(args.data)
    work = Path(tempfile.mkdtemp(prefix="slimkit-auto-bench-"))
    rows, checks = [], []

    def train(name):
        return fit(sk.zoo.for_task(name, task, seed=0), task, TrainConfig(epochs=args.epochs, **DEMO_TRAIN), progress=False).model

    # 1. the advisor case
    t0 = time.perf_counter()
    lenet = train("lenet5")
    t1 = time.perf_counter()
    infeasible = None
    try:
        result = advise(lenet, task, AutoConfig(max_accuracy_drop=0.5, trials=args.trials, time_budget_s=budget_s),
                        work / "auto", model_name="zoo:lenet5")
    except InfeasibleError as err:  # no recommendation: record what was measured and fail the quality checks
        infeasible = str(err)
        result = json.loads((work / "auto" / "result.json").read_text())
    minutes = (time.perf_counter() - t0) / 60
    advisor_minutes = (time.perf_counter() - t1) / 60
    if infeasible is None:
        base, final = result["stages"][0]["metrics"], result["stages"][-1]["metrics"]
        size_x = base["size_bytes"] / final["size_bytes"]
        speed_x = latency(base, "onnxruntime", 64) / latency(final, "onnxruntime", 64)
        drop = 100 * (base["accuracy"] - final["accuracy"])
        rows.append({"case": "auto lenet5", "recipe": describe(result["sections"]["recommendation"]["params"]),
                     "test_acc": 100 * final["accuracy"], "drop_pts": drop, "bytes": final["size_bytes"],
                     "x_smaller": size_x, "ort_x_faster": speed_x, "ort_batch": 64, "minutes": minutes,
                     "advisor_minutes": advisor_minutes, "budget": result["sections"]["advisor"]["budget"]})
    else:
        size_x = speed_x = drop = None
        rows.append({"case": "auto lenet5", "recipe": f"no recommendation: {infeasible}", "minutes": minutes,
                     "advisor_minutes": advisor_minutes, "budget": result["sections"]["advisor"]["budget"]})
    pareto = result["sections"]["pareto front (validation split)"]
    b = pareto["baseline"]  # validation-split figures of the original, for the trial and student rows
    for t in pareto["trials"]:
        rows.append({"case": f"  trial {t['trial']}", "recipe": describe(t["params"]), "val_drop_pts": 100 * (b["accuracy"] - t["accuracy"]),
                     "bytes": t["size_bytes"], "x_smaller": b["size_bytes"] / t["size_bytes"],
                     "ort_x_faster": b["latency_ms"] / t["latency_ms"],
                     **({"subset_val_drop_pts": 100 * (b["accuracy"] - t["subset"]["accuracy"])} if t.get("subset") else {})})
    for r in result["sections"].get("student screening (validation split)", {}).get("students", []):
        rows.append({"case": "  student", "recipe": describe_student(r["student"]) + (" (kept)" if r["kept"] else ""),
                     "val_drop_pts": 100 * (b["accuracy"] - r["accuracy"]), "params": r["params"], "macs": r["macs"],
                     "kd_val_drop_pts": 100 * (b["accuracy"] - r["kd_accuracy"]),
                     "labels_val_drop_pts": 100 * (b["accuracy"] - r["labels_accuracy"])})
    checks += [check("auto: >= 10x smaller on disk", size_x, ">= 10", size_x is not None and size_x >= 10),
               check("auto: >= 2x faster in ONNX Runtime (batch 64, 1 thread)", speed_x, ">= 2",
                     speed_x is not None and speed_x >= 2),
               check("auto: accuracy drop within 0.5 points (test)", drop, "<= 0.5", drop is not None and drop <= 0.5),
               check("auto: under 15 minutes (incl. baseline training)", minutes, "< 15", minutes < 15)]
    if budget_s is not None:
        checks.append(check(f"auto: the advisor within its --time-budget {args.time_budget}", round(advisor_minutes, 2),
                            f"<= {budget_s / 60:g} min", advisor_minutes * 60 <= budget_s))

    # 2. presets
    models = {}
    for preset in [p for p in args.presets.split(",") if p]:
        name = PRESETS[preset]
        models.setdefault(name, train(name))
        t0 = time.perf_counter()
        res = sk.compress(models[name], Path("recipes") / f"{preset}.yaml", task, work / preset, model_name=f"zoo:{name}")
        b = res["stages"][0]["metrics"]
        ort_batches = sorted(r["batch_size"] for r in b["latency"] if r["runtime"].startswith("onnxruntime"))
        batch = 64 if 64 in ort_batches else ort_batches[-1]  # the recipe's own largest batch otherwise
        for s in res["stages"]:
            m = s["metrics"]
            rows.append({"case": f"preset {preset} ({name})", "recipe": s["name"], "test_acc": 100 * (m.get("accuracy") or 0),
                         "drop_pts": 100 * (b["accuracy"] - m["accuracy"]), "bytes": m["size_bytes"],
                         "x_smaller": b["size_bytes"] / m["size_bytes"],
                         "ort_x_faster": latency(b, "onnxruntime", batch) / latency(m, "onnxruntime", batch),
                         "ort_batch": batch, "minutes": (time.perf_counter() - t0) / 60})
        checks.append(check(f"preset {preset} runs on {name}", len(res["stages"]) - 1, "all stages", not any(s.get("error") for s in res["stages"])))
    print_table(rows, ["case", "recipe", "test_acc", "val_drop_pts", "subset_val_drop_pts", "drop_pts", "bytes", "x_smaller", "ort_x_faster", "ort_batch", "params", "macs", "kd_val_drop_pts", "labels_val_drop_pts", "minutes", "advisor_minutes"])
    write_result(args.out, "auto", {**environment(), "data": args.data, "splits": task.info.get("splits")}, rows, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`slimkit demo`: train LeNet-5 on digits, run every registered technique's demo config on it,
then the advisor (`slimkit auto` with a 0.5-point budget), and write `report.html` and `result.json`
(the advisor's own report and recommended model go to `auto/`)."""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from slimkit import data, zoo
from slimkit.core import registry
from slimkit.core.artifact import save
from slimkit.core.io import output_dir
from slimkit.core.progress import console, format_seconds
from slimkit.core.trainer import TrainConfig, fit
from slimkit.errors import ConfigError, SlimkitError
from slimkit.pipeline.stage import Timed, evaluate_stage, retime, run_stage
from slimkit.report import new_result, stage_entry, write_html, write_json

DEMO_TRAIN = dict(lr=2e-3, optimizer="adam", seed=0)
# Measured on 2 idle cores (AMD EPYC, AVX-512 VNNI, `slimkit demo`, 30 baseline epochs, 2026-12-02): the
# baseline training and the whole demo. The estimate after the baseline scales the total by how long it took here.
REFERENCE_BASELINE_S = 5.0
REFERENCE_TOTAL_S = {True: 225.0, False: 20.0}  # with / without the advisor


def _check_only(only: list[str] | None) -> None:
    if only is None:
        return
    known = [t.name for t in registry.techniques()]
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ConfigError(f"demo --only: unknown technique(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")


def run_demo(out: str | Path = "slimkit-out", *, epochs: int = 30, only: list[str] | None = None,
             advisor: bool = True, advisor_config=None) -> dict[str, Any]:
    """only: technique names to run (None: every registered technique; [] none, only the baseline and advisor).
    advisor_config: an `AutoConfig` for the advisor run (default: a 0.5-point budget)."""
    _check_only(only)
    out = Path(out)
    artifacts = out / "artifacts"
    output_dir(artifacts)
    task = data.digits()
    console.print(f"[bold]slimkit demo[/bold]: LeNet-5 on digits ({len(task.train)} train / {len(task.val)} val / "
                  f"{len(task.test)} test images, 28x28)")
    full = only is None and epochs == 30
    if full:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        console.print(f"expected time: about {format_seconds(REFERENCE_TOTAL_S[advisor])} on 2 idle cores; this machine "
                      f"has {os.cpu_count()} cores, load average {load:.1f} (a loaded machine takes longer; a "
                      "new estimate follows the baseline)", markup=False, highlight=False)
    t_start = t0 = time.perf_counter()
    trained = fit(zoo.for_task("lenet5", task, seed=DEMO_TRAIN["seed"]), task, TrainConfig(epochs=epochs, **DEMO_TRAIN), description="baseline").model
    train_s = time.perf_counter() - t0
    if full:
        estimate = REFERENCE_TOTAL_S[advisor] * train_s / REFERENCE_BASELINE_S
        console.print(f"baseline trained in {format_seconds(train_s)} ({REFERENCE_BASELINE_S:.0f}s on the reference "
                      f"machine): expect about {format_seconds(estimate)} in all", markup=False, highlight=False)
    baseline_path = save(trained, artifacts / "baseline.safetensors")
    result = new_result({"name": "lenet5", "source": "zoo:lenet5"},
                        {"name": task.name, "splits": task.info.get("splits"), "input_shape": list(task.input_shape)})
    metrics = evaluate_stage(trained, task, baseline_path, reference=None)
    result["stages"].append(stage_entry("baseline", technique="train", family="baseline",
                                        config=TrainConfig(epochs=epochs, **DEMO_TRAIN).to_dict(),
                                        metrics=metrics.to_dict(), artifact=str(baseline_path), seconds=train_s,
                                        notes=["fp32 dense weights (slimkit safetensors)"]))
    console.print(f"baseline: accuracy {100 * metrics.accuracy:.2f}%, {metrics.size_bytes:,} bytes "
                  f"({format_seconds(time.perf_counter() - t0)})", markup=False, highlight=False)
    timed = [Timed(trained, baseline_path)]  # what each entry's latency rows were measured on
    for technique in registry.techniques():
        if only is not None and technique.name not in only:
            continue
        config = technique.demo(trained, task) if technique.demo else None
        if config is None:
            continue
        console.print(f"stage [bold]{technique.name}[/bold] ...")
        t0 = time.perf_counter()
        try:
            outcome = run_stage(trained, config, task, artifacts, reference=trained)
            entry = outcome.entry
            timed.append(Timed(outcome.model, outcome.artifact))
            m = outcome.metrics
            console.print(f"  accuracy {100 * (m.accuracy or 0):.2f}%, {m.size_bytes:,} bytes "
                          f"({format_seconds(time.perf_counter() - t0)}; {format_seconds(time.perf_counter() - t_start)} "
                          "so far)", markup=False, highlight=False)
        except SlimkitError as err:
            entry = stage_entry(technique.name, technique=technique.name, family=technique.family,
                                config=config.to_dict(), error=str(err))
            console.print(f"  [red]failed[/red]: {err}")
            timed.append(None)
        except Exception as err:  # a bug in one technique must not hide the others' results
            entry = stage_entry(technique.name, technique=technique.name, family=technique.family,
                                config=config.to_dict(), error=f"{type(err).__name__}: {err}")
            console.print(f"  [red]crashed[/red]: {err}\n{traceback.format_exc()}")
            timed.append(None)
        result["stages"].append(entry)
    retime(result, timed, task)
    if advisor:
        t0 = time.perf_counter()
        result["sections"]["advisor"] = _advisor_section(trained, task, out, advisor_config)
        console.print(f"  advisor: {format_seconds(time.perf_counter() - t0)}", markup=False, highlight=False)
    write_json(result, out / "result.json")
    write_html(result, out / "report.html")
    console.print(f"demo finished in {format_seconds(time.perf_counter() - t_start)}", markup=False, highlight=False)
    return result


def _advisor_section(trained, task, out: Path, config=None) -> dict[str, Any]:
    """Run the advisor on the trained baseline; its report is linked from the demo's report."""
    import html

    from slimkit.pipeline.advisor import AutoConfig, advise

    config = config or AutoConfig(max_accuracy_drop=0.5)
    console.print(f"[bold]advisor[/bold] (slimkit auto, max accuracy drop {config.max_accuracy_drop} points) ...")
    try:
        res = advise(trained, task, config, out / "auto", model_name="zoo:lenet5")
    except SlimkitError as err:
        console.print(f"  [red]no recommendation[/red]: {err}")
        return {"html": f"<div class=card><p>The advisor found no recipe: {html.escape(str(err))}</p></div>",
                "error": str(err)}
    rec = res["sections"]["recommendation"]
    first, last = res["stages"][0]["metrics"], res["stages"][-1]["metrics"]
    summary = (f"{first['size_bytes'] / last['size_bytes']:.1f}x smaller on disk, test accuracy "
               f"{100 * (last['accuracy'] - first['accuracy']):+.2f} points")
    headline = next((r for r in rec["reasons"] if r.startswith("Recommended")), "")
    console.print(f"  {headline} On test data: {summary}.")
    return {"html": "<div class=card><p><b>Advisor recommendation</b> (" + html.escape(summary) + "): "
                    "full report in <a href=\"auto/report.html\">auto/report.html</a>, recipe in "
                    "<code>auto/recipe.yaml</code>.</p><ul>"
                    + "".join(f"<li>{html.escape(r)}</li>" for r in rec["reasons"]) + "</ul></div>",
            "params": rec["params"], "reasons": rec["reasons"], "summary": summary}

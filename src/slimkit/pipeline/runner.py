"""`compress`: run a recipe's stages, evaluating and checkpointing after each one.

Output folder:
    checkpoints/stage-NN.safetensors   the model after stage NN (rebuildable with slimkit.load)
    artifacts/                         each stage's deployable file (int8 ONNX, packed .slim, ...)
    state.json                         finished stages and their result entries (written atomically)
    result.json, report.html           written at the end

A run killed at any point and started again with the same command continues after the last
finished stage: stages are deterministic given the recipe seed, so the result is the same.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit.core import registry
from slimkit.core.artifact import load, save
from slimkit.core.io import output_dir, write_text
from slimkit.core.progress import console
from slimkit.core.recovery import keep_zeros, recover
from slimkit.core.state import get_state
from slimkit.core.task import Task
from slimkit.core.trainer import seed_everything
from slimkit.errors import ConfigError
from slimkit.pipeline.recipe import Recipe, load_recipe
from slimkit.pipeline.stage import Timed, evaluate_stage, retime, run_stage
from slimkit.report import new_result, stage_entry, write_html, write_json

STATE_FILE = "state.json"


def _apply_recovery(model: nn.Module, original: nn.Module, task: Task, stage, seed: int) -> nn.Module:
    if stage.recovery is None or not stage.recovery.active:
        return model
    verb = "recover" if stage.recovery.method == "distill" else "fine-tune"
    return recover(model, original, task, stage.recovery, seed=seed, on_step=keep_zeros(model),
                   description=f"{verb} {stage.technique}")


def check_constraints(recipe: Recipe, baseline: dict[str, Any], final: dict[str, Any]) -> list[dict[str, Any]]:
    """Each constraint of the recipe as {name, value, limit, ok} for the final stage's metrics."""
    c = recipe.constraints
    rows = []
    if c.max_accuracy_drop is not None and baseline.get("accuracy") is not None and final.get("accuracy") is not None:
        drop = 100 * (baseline["accuracy"] - final["accuracy"])
        rows.append({"name": "accuracy drop (points)", "value": drop, "limit": c.max_accuracy_drop,
                     "ok": drop <= c.max_accuracy_drop})
    if c.max_size_kb is not None and final.get("size_bytes") is not None:
        kb = final["size_bytes"] / 1024
        rows.append({"name": "size (KiB)", "value": kb, "limit": c.max_size_kb, "ok": kb <= c.max_size_kb})
    if c.max_latency_ms is not None:
        runtime = "onnxruntime" if c.latency_runtime == "ort" else "torch"
        ms = next((r["median_ms"] for r in final.get("latency", []) if r["runtime"].startswith(runtime)
                   and r["batch_size"] == c.latency_batch_size), None)
        rows.append({"name": f"latency ms ({c.latency_runtime}, batch {c.latency_batch_size})", "value": ms,
                     "limit": c.max_latency_ms, "ok": ms is not None and ms <= c.max_latency_ms})
    return rows


def compress(model: nn.Module, recipe: Recipe | str | Path | dict, task: Task, out: str | Path = "slimkit-out", *,
             resume: bool = True, model_name: str | None = None) -> dict[str, Any]:
    """Run `recipe` on `model`; returns the result dict (also written as result.json + report.html)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out)
    ckpt_dir, art_dir = out / "checkpoints", out / "artifacts"
    output_dir(ckpt_dir)
    output_dir(art_dir)
    ev = recipe.evaluation
    eval_kw = dict(runtimes=tuple(ev.runtimes), threads=ev.threads, batch_sizes=tuple(ev.batch_sizes), split=ev.split)
    source = get_state(model)["source"]
    digest = recipe.digest()

    state_path = out / STATE_FILE
    state: dict[str, Any] | None = None
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("recipe_digest") != digest or state.get("source") != source:
            raise ConfigError(f"{out} holds a run of a different recipe or model; use another --out or --no-resume")
        console.print(f"resuming: {len(state['entries']) - 1} of {len(recipe.stages)} stages already done")

    original = model.eval()
    if state is None:
        baseline_path = save(original, art_dir / "00-original.safetensors")
        metrics = evaluate_stage(original, task, baseline_path, reference=None, **eval_kw)
        state = {"recipe_digest": digest, "source": source, "entries": [
            stage_entry("original", technique="original", family="baseline", metrics=metrics.to_dict(),
                        artifact=str(baseline_path), notes=["fp32 dense weights (slimkit safetensors)"])]}
        write_text(state_path, json.dumps(state, indent=2, default=str))
    done = len(state["entries"]) - 1
    current = load(ckpt_dir / f"stage-{done:02d}.safetensors") if done else original

    for i, stage in enumerate(recipe.stages[done:], start=done + 1):
        name = f"{i:02d}-{stage.name or stage.technique}"
        console.print(f"stage {i}/{len(recipe.stages)}: [bold]{stage.technique}[/bold]")
        seed_everything(recipe.seed + i)
        config = stage.technique_config()
        outcome = run_stage(current, config, task, art_dir, name=name, reference=original, **eval_kw)
        current = outcome.model
        entry = outcome.entry
        if stage.recovery is not None and stage.recovery.method != "none":
            current = _apply_recovery(current, original, task, stage, recipe.seed + i)
            technique = registry.get(stage.technique)
            art = Path(technique.write_artifact(current, art_dir / name, task)) if technique.write_artifact else \
                save(current, art_dir / f"{name}.safetensors")
            metrics = evaluate_stage(current, task, art, reference=original, torch_runs=technique.runtime != "ort",
                                     **eval_kw)
            entry["metrics"] = metrics.to_dict()
            entry["artifact"] = str(art)
            entry["notes"].append(f"recovered by {stage.recovery.method} for {stage.recovery.epochs} epoch(s)")
            entry["config"] = {**entry["config"], "recovery": stage.recovery.to_dict()}
        save(current, ckpt_dir / f"stage-{i:02d}.safetensors")
        state["entries"].append(entry)
        write_text(state_path, json.dumps(state, indent=2, default=str))

    result = new_result({"name": model_name or (source or {}).get("ref", type(model).__name__), "source": source},
                        {"name": task.name, "input_shape": list(task.input_shape)})
    result["stages"] = state["entries"]
    # every stage timed again beside the original, in interleaved rounds (resumed stages from their checkpoints)
    timed = [Timed(original, Path(state["entries"][0]["artifact"]))]
    timed += [Timed(current if i == len(recipe.stages) else load(ckpt_dir / f"stage-{i:02d}.safetensors"),
                    Path(e["artifact"]) if e.get("artifact") else None)
              for i, e in enumerate(state["entries"][1:], start=1)]
    retime(result, timed, task, threads=ev.threads)
    result["recipe"] = recipe.to_dict()
    constraints = check_constraints(recipe, state["entries"][0]["metrics"], state["entries"][-1]["metrics"])
    result["sections"]["constraints"] = constraints
    write_json(result, out / "result.json")
    write_html(result, out / "report.html")
    return result

"""NAS report: search.json (every trial, Pareto front, chosen), pareto.png, report.md, and the chosen
architecture exported as best.safetensors (loadable with `slimkit.load`) plus best.json (its spec)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimkit.core.io import atomic_path, write_text
from slimkit.search.cost import COST_KEY

_COST_LABEL = {"macs": "MACs (batch 1)", "params": "parameters", "latency": "predicted latency (ms)"}


def write_report(result, out_dir: str | Path, config) -> dict[str, str]:
    """Write the report files into `out_dir`; returns {name: path} (also stored in result.artifacts)."""
    from slimkit.core.artifact import save
    from slimkit.report import environment

    out_dir = Path(out_dir)
    paths: dict[str, str] = {}
    if result.model is not None:
        paths["model"] = str(save(result.model, out_dir / "best.safetensors"))
        paths["spec"] = str(write_text(out_dir / "best.json", json.dumps(result.best["spec"], indent=1)))
    plot = pareto_plot(result, out_dir / "pareto.png", config.objective)
    if plot is not None:
        paths["plot"] = str(plot)
    data = {"study": result.study_name, "storage": result.storage, "config": config.to_dict(),
            "environment": environment(config.train_threads), "info": result.info, "best": result.best,
            "pareto": [r["trial"] for r in result.pareto], "trials": result.rows}
    paths["json"] = str(write_text(out_dir / "search.json", json.dumps(data, indent=1, default=str)))
    paths["report"] = str(write_text(out_dir / "report.md", markdown(result, config)))
    result.artifacts.update(paths)
    return paths


def pareto_plot(result, path: Path, objective: str) -> Path | None:
    """Accuracy vs cost of every completed trial, the Pareto front as a step line, the chosen starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = COST_KEY[objective], _COST_LABEL[objective]
    done = [r for r in result.rows if r["val_accuracy"] is not None and r[key] is not None]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r[key] for r in done], [r["val_accuracy"] for r in done], s=14, alpha=0.6, label="trials")
    front = [r for r in result.pareto if r[key] is not None]
    ax.step([r[key] for r in front], [r["val_accuracy"] for r in front], where="post", color="C3", label="Pareto front")
    if result.best is not None:
        ax.scatter([result.best[key]], [result.best["val_accuracy"]], marker="*", s=160, color="C2", label="chosen")
    limit = result.info.get("constraints", {}).get({"macs": "max_macs", "params": "max_params",
                                                    "latency": "max_latency_ms"}[objective])
    if limit:
        ax.axvline(limit, color="grey", linestyle="--", label="limit")
    ax.set_xlabel(label)
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"NAS {result.study_name}: {len(done)} trials")
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _arch(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "-"
    if spec["space"] == "mbconv":
        stages = " ".join(f"d{s['depth']}k{s['kernel']}e{s['expansion']}{'+se' if s['se'] else ''}" for s in spec["stages"])
        return f"w{spec['width']:g} {stages}"
    cell = ",".join(f"{n['op']}<{n['input']}" for n in spec["cell"])
    return f"w{spec['width']:g} x{spec['cells_per_stage']} [{cell}]"


def markdown(result, config) -> str:
    key, label = COST_KEY[config.objective], _COST_LABEL[config.objective]
    lines = [f"# NAS report: {result.study_name}", "",
             f"strategy `{config.strategy}`, space `{config.space}`, {config.trials} trials of {config.epochs} "
             f"proxy epoch(s); constraints {result.info.get('constraints')}; storage `{result.storage}`", ""]
    if result.info.get("warning"):
        lines += [f"**Warning**: {result.info['warning']}.", ""]
    if result.best is not None:
        b = result.best
        mean = (f" (mean {100 * b['val_accuracy_mean']:.2f}% over {b['fresh_seeds']} fresh seeds)"
                if "val_accuracy_mean" in b else "")
        lines += [f"**Chosen**: trial {b['trial']} — val accuracy {100 * b['val_accuracy']:.2f}%{mean}, "
                  f"{b['macs']:,} MACs, {b['param_count']:,} params — `{_arch(b['spec'])}`", ""]
    warm = result.info.get("controller_warmup")
    if warm:
        lines += [f"Controller warm-up (ENAS-style): {warm['samples']} architectures scored by weight-sharing one-shot "
                  f"nets (widths {', '.join(f'{w:g}' for w in warm['widths'])}) before the first trial; mean reward "
                  f"{warm['reward_first']:.3f} in the first batch, {warm['reward_last']:.3f} in the last "
                  f"({warm['seconds']:.0f} s).", ""]
    finalists = result.info.get("finalists")
    if finalists:
        lines += [f"The {len(finalists)} most accurate trials were proxy-trained again with "
                  f"{finalists[0]['fresh_seeds']} fresh seeds; the best mean validation accuracy "
                  "over the fresh seeds was chosen (one short training's accuracy is noisy, and the most accurate "
                  "of many runs is a lucky one, so the trial's own run is listed first but not averaged in).", "",
                  "| trial | val accuracy: trial's run; fresh seeds | mean of fresh seeds |", "|---|---|---|"]
        lines += [f"| {f['trial']} | {100 * f['val_accuracy_seeds'][0]:.2f}%; "
                  f"{', '.join(f'{100 * a:.2f}%' for a in f['val_accuracy_seeds'][1:])} | "
                  f"{100 * f['val_accuracy_mean']:.2f}% |" for f in finalists]
        lines.append("")
    latency = config.objective == "latency"  # MACs and params have their own columns already
    lines += ["## Pareto front", "", "| trial | val accuracy | MACs | params |" + (f" {label} |" if latency else "")
              + " architecture |", "|---|---|---|---|" + ("---|" if latency else "") + "---|"]
    for r in result.pareto:
        lines.append(f"| {r['trial']} | {100 * r['val_accuracy']:.2f}% | {r['macs']:,} | {r['param_count']:,} | "
                     + (f"{r[key]:.4g} | " if latency else "") + f"`{_arch(r['spec'])}` |")
    top = sorted((r for r in result.rows if r["val_accuracy"] is not None), key=lambda r: -r["val_accuracy"])[:10]
    lines += ["", "## Most accurate trials", "", "| trial | val accuracy | MACs | params | architecture |", "|---|---|---|---|---|"]
    for r in top:
        lines.append(f"| {r['trial']} | {100 * r['val_accuracy']:.2f}% | {r['macs']:,} | {r['param_count']:,} | `{_arch(r['spec'])}` |")
    lines += ["", "![Pareto plot](pareto.png)", ""]
    return "\n".join(lines) + "\n"

"""The advisor's explanation and report: the reasons in words (every number from the measurements, every
ratio from the side-by-side timing), the Pareto plots, the trial and screening tables."""
from __future__ import annotations

import statistics

from slimkit.evaluate.latency import describe_speedup, speedup
from slimkit.core import registry
from slimkit.pipeline.advisor_space import FP32, AutoConfig, describe_params, describe_student
from slimkit.report.html import figure_png, heatmap, latency_cell

# -- explanation --------------------------------------------------------------------------------
def _drop_at(analysis: dict, layer: str, value) -> float:
    for v, acc in analysis["curves"][layer]:
        if v == value:
            return 100 * (analysis["baseline"] - acc)
    return float("nan")


def explain(sens: dict[str, dict], base: dict, chosen: dict, points: list[dict], config: AutoConfig,
            screening: list[dict] = ()) -> list[str]:
    """Plain-language reasons, every number taken from the measurements."""
    lines = []
    if screening:
        base_macs = base["metrics"].get("macs") or 0
        within = [r for r in screening if 100 * (base["accuracy"] - r["accuracy"]) <= config.max_accuracy_drop + 1e-9]
        line = (f"{len(screening)} smaller zoo networks were trained as candidate students, each distilled from the "
                f"model and on the labels alone ({config.student_epochs} epochs on shifted copies of the training "
                f"images, the better of the two kept); {len(within)} stay within "
                f"{config.max_accuracy_drop} points on validation data")
        if within:
            best = within[0]
            share = f", {100 * best['macs'] / base_macs:.0f}% of the original's MACs" if base_macs else ""
            line += (f"; the cheapest of them, {describe_student(best['student'])} ({best['params']:,} parameters{share}), "
                     f"changes accuracy by {100 * (best['accuracy'] - base['accuracy']):+.2f} points")
        lines.append(line + ".")
        by_labels = [r for r in screening if r["labels_accuracy"] > r["kd_accuracy"]]
        if by_labels:
            lines.append(f"{len(by_labels)} of {len(screening)} students were more accurate trained on the hard labels "
                         f"than distilled from the model (mean {100 * statistics.mean(r['labels_accuracy'] for r in screening):.2f}% "
                         f"vs {100 * statistics.mean(r['kd_accuracy'] for r in screening):.2f}% on validation): the model's own "
                         "errors limit what its soft targets teach, so those students learn from the labels.")
    sp = sens["sparsity"]
    grid = [v for v, _ in next(iter(sp["curves"].values()))]
    high = 0.9 if 0.9 in grid else grid[-1]
    robust = [n for n in sp["curves"] if _drop_at(sp, n, high) <= 0.5]
    fragile = max(sp["curves"], key=lambda n: _drop_at(sp, n, high))
    if robust:
        lines.append(f"Layers {', '.join(robust)} keep accuracy within 0.5 points at {int(100 * high)}% sparsity "
                     f"(each pruned alone, validation split), so unstructured pruning and packing shrink them cheaply.")
    lines.append(f"{fragile} is the layer most sensitive to pruning: it loses {_drop_at(sp, fragile, high):.1f} points "
                 f"at {int(100 * high)}% sparsity on its own, so a global threshold prunes it least.")
    bits = sens["bits"]
    worst4 = max(bits["curves"], key=lambda n: _drop_at(bits, n, 4))
    lines.append(f"With 4-bit per-channel weights the worst layer ({worst4}) loses {_drop_at(bits, worst4, 4):.1f} points; "
                 f"at 8 bits no layer loses more than "
                 f"{max(_drop_at(bits, n, 8) for n in bits['curves']):.1f}.")
    per_tensor = sens["bits_per_tensor"]
    gaps = {n: _drop_at(per_tensor, n, 4) - _drop_at(bits, n, 4) for n in bits["curves"]}
    worst_gap = max(gaps, key=gaps.get)
    if gaps[worst_gap] > 1.0:
        lines.append(f"{worst_gap} loses {_drop_at(per_tensor, worst_gap, 4):.1f} points with one 4-bit scale per tensor "
                     f"but {_drop_at(bits, worst_gap, 4):.1f} with per-channel scales, so per-channel scales are used.")
    rank = sens["rank"]
    low_rank_ok = [n for n in rank["curves"] if _drop_at(rank, n, 0.8) <= 0.5]
    if low_rank_ok:
        lines.append(f"Layers {', '.join(low_rank_ok)} keep accuracy with 80% of their singular-value energy.")

    # runtime facts from the trials: a format that runs on ONNX Runtime vs fp32 on the same network
    for p in points:
        fmt = p["params"]["format"]
        if fmt == FP32 or registry.get(fmt.split(":", 1)[0]).runtime != "ort":
            continue
        twin = next((q for q in points if q["params"] == {**p["params"], "format": FP32}), None)
        ref = twin or (base if {**p["params"], "format": FP32} == base["params"] else None)
        if ref is not None and "timing" in ref and "timing" in p:
            s = speedup(ref["timing"], p["timing"])  # both from the one side-by-side comparison
            why = (" (on layers this small the quantize/dequantize overhead decides)"
                   if s["reliable"] and s["speedup"] < 1 else "")
            lines.append(f"{describe_params({'format': fmt})} in {config.runtime} ran "
                         f"{describe_speedup(s, 'fp32 on the same network')} (batch {config.latency_batch_size}, "
                         f"{config.threads} thread, timed side by side){why}.")
            break
    size_x = base["size_bytes"] / chosen["size_bytes"]
    drop = 100 * (base["accuracy"] - chosen["accuracy"])
    desc = describe(chosen["params"])
    lines.append(f"Recommended: {desc}. On validation data it is {size_x:.1f}x smaller on disk and "
                 f"{_speed_words(chosen)} in {config.runtime} (batch {config.latency_batch_size}, timed side by side "
                 f"with the original), accuracy {-drop:+.2f} points (budget: a drop of at most {config.max_accuracy_drop}).")
    fmt = chosen["params"]["format"]
    if fmt != FP32 and registry.get(fmt.split(":", 1)[0]).runtime == "torch":
        lines.append("The file this format writes is what ships; slimkit.load() turns it into a dense model, which "
                     "runs in ONNX Runtime as fp32 (the latency above is that model's).")
    return lines


def _speed_words(point: dict) -> str:
    """'2.3x faster (2.1-2.5x across rounds)' from the point's side-by-side timing against the original."""
    vs = (point.get("timing") or {}).get("vs_baseline")
    if vs is None:
        return "of unmeasured speed"
    return describe_speedup(vs)


def _faster_cell(point: dict) -> str:
    vs = (point.get("timing") or {}).get("vs_baseline")
    if vs is None:
        return ""
    return f"{vs['speedup']:.1f}" if vs["reliable"] else f"<span title='{describe_speedup(vs)}'>&asymp;1</span>"


def describe(params: dict) -> str:
    return describe_params(params)


# -- plots --------------------------------------------------------------------------------------
def pareto_plot(base: dict, points: list[dict], front: list[dict], chosen: dict | None, x: str, xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[x] for p in points], [100 * p["accuracy"] for p in points], c="#bbbbbb", label="trials")
    front_sorted = sorted(front, key=lambda p: p[x])
    ax.plot([p[x] for p in front_sorted], [100 * p["accuracy"] for p in front_sorted], "o-", c="#1f77b4", label="Pareto front")
    ax.scatter([base[x]], [100 * base["accuracy"]], marker="s", c="k", label="original")
    if chosen is not None:
        ax.scatter([chosen[x]], [100 * chosen["accuracy"]], marker="*", s=200, c="#d62728", label="recommended")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _trials_table(base: dict, points: list[dict], front: list[dict], chosen: dict | None) -> str:
    import html

    rows = ["<tr><th>trial</th><th class=l>recipe</th><th>val accuracy</th><th>&Delta; pts</th><th>bytes</th>"
            "<th>&times; smaller</th><th>latency ms</th><th>&times; faster</th><th>Pareto</th></tr>"]
    for p in [base] + sorted(points, key=lambda p: p["trial"]):
        mark = "&#9733;" if chosen is p else ("&#9679;" if p in front else "")
        recipe = describe(p["params"]) if p is not base else "original (fp32 ONNX)"
        if p.get("finalist"):
            recipe += f" [finalist: rebuilt on all training images; on the subset {100 * p['subset']['accuracy']:.2f}%]"
        rows.append(f"<tr><td>{p['trial']}</td><td class=l>{html.escape(recipe)}</td>"
                    f"<td>{100 * p['accuracy']:.2f}%</td><td>{100 * (p['accuracy'] - base['accuracy']):+.2f}</td>"
                    f"<td>{int(p['size_bytes']):,}</td><td>{base['size_bytes'] / p['size_bytes']:.1f}</td>"
                    f"{latency_cell(p.get('timing') or {'median_ms': p['latency_ms']})}"
                    f"<td>{_faster_cell(p) if p is not base else '1.0'}</td><td>{mark}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _screening_table(base: dict, rows: list[dict]) -> str:
    import html

    out = ["<table><tr><th class=l>student</th><th>parameters</th><th>MACs</th><th>val acc. distilled</th>"
           "<th>val acc. labels only</th><th>&Delta; pts (better)</th><th>kept for the search</th></tr>"]
    for r in rows:
        out.append(f"<tr><td class=l>{html.escape(describe_student(r['student']))}</td><td>{r['params']:,}</td>"
                   f"<td>{r['macs']:,}</td><td>{100 * r['kd_accuracy']:.2f}%</td><td>{100 * r['labels_accuracy']:.2f}%</td>"
                   f"<td>{100 * (r['accuracy'] - base['accuracy']):+.2f}</td><td>{'yes' if r['kept'] else ''}</td></tr>")
    return "".join(out) + "</table>"


def search_sections(base, points, front, chosen, screening, sens, config: AutoConfig) -> dict[str, dict]:
    """Report sections of the search: Pareto plots and trial table, student screening, heatmaps."""
    sections = {}
    plots = [pareto_plot(base, points, front, chosen, "size_bytes", "bytes on disk (log)"),
             pareto_plot(base, points, front, chosen, "latency_ms",
                         f"latency ms, {config.runtime}, batch {config.latency_batch_size} (log)")]
    sections["pareto front (validation split)"] = {
        "html": "<div class=plots>" + "".join(f'<img alt="Pareto plot" src="{p}">' for p in plots) + "</div>"
                + _trials_table(base, points, front, chosen),
        "baseline": base, "trials": points, "front": [p["trial"] for p in front]}
    if screening:
        sections["student screening (validation split)"] = {
            "html": _screening_table(base, screening), "students": screening}
    maps = [heatmap(sens["sparsity"], "accuracy drop vs sparsity (one layer at a time)", "sparsity"),
            heatmap(sens["rank"], "accuracy drop vs kept SVD energy", "energy kept"),
            heatmap(sens["bits"], "accuracy drop vs weight bits (per-channel)", "bits")]
    sections["per-layer sensitivity"] = {
        "html": "<div class=plots>" + "".join(f'<img alt="sensitivity heatmap" src="{m}">' for m in maps) + "</div>",
        "analysis": sens}
    return sections

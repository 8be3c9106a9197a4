"""Self-contained HTML report: summary, stage table, accuracy-vs-size and accuracy-vs-latency
plots (PNG embedded as base64), extra sections, environment. No external assets or scripts."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from slimkit.core.io import write_text
from slimkit.evaluate.latency import NOISY_SPREAD, describe_speedup

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:right;vertical-align:top}
th{background:#f4f6f8} td.l,th.l{text-align:left}
.err{color:#b00020} .sim{color:#8a6d00} .good{color:#0a7d32} .bad{color:#b00020}
.noisy{background:#fff3cd} .warn{border-left:4px solid #d9a400}
.plots{display:flex;flex-wrap:wrap;gap:1rem} .plots img{max-width:580px;width:100%;border:1px solid #eee}
.card{background:#f8f9fb;border:1px solid #e3e6ea;border-radius:6px;padding:.8rem 1rem;margin:1rem 0}
code,pre{background:#f4f6f8;padding:.1rem .3rem;border-radius:3px;font-size:.85rem}
pre{padding:.6rem;overflow-x:auto}
"""


def _fmt_int(v) -> str:
    return "" if v is None else f"{int(v):,}"


def _latency_row(metrics: dict, runtime: str, batch: int) -> dict | None:
    for row in metrics.get("latency", []) or []:
        if row["runtime"].startswith(runtime) and row["batch_size"] == batch:
            return row
    return None


def _latency(metrics: dict, runtime: str, batch: int) -> float | None:
    row = _latency_row(metrics, runtime, batch)
    return None if row is None else row["median_ms"]


def _noisy(row: dict | None) -> bool:
    return row is not None and row.get("p10_ms") and row.get("p90_ms", 0) / row["p10_ms"] > NOISY_SPREAD


def latency_cell(row: dict | None) -> str:
    """Median with its p10-p90 spread and, when timed side by side with the baseline, the ratio to it
    (`speedup`, round by round; "no clear difference" when the rounds disagree). A spread wider than
    NOISY_SPREAD is flagged."""
    if row is None:
        return "<td></td>"
    spread = (f"<br><small>{row['p10_ms']:.3f}&ndash;{row['p90_ms']:.3f}</small>"
              if row.get("p10_ms") is not None and row.get("p90_ms") is not None else "")
    vs = row.get("vs_baseline")
    if vs:
        ratio = (f"{vs['speedup']:.2f}x" if vs["reliable"] else "&asymp;1x") + " vs baseline"
        spread += f"<br><small title='{html.escape(describe_speedup(vs))}'>{ratio}</small>"
    flag = " class=noisy title='p90/p10 spread above 1.5x: a ratio from this cell is unreliable'" if _noisy(row) else ""
    return f"<td{flag}>{row['median_ms']:.3f}{spread}</td>"


def figure_png(fig) -> str:
    """Render a matplotlib figure to a base64 PNG data URI."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def heatmap(analysis: dict, title: str, value_label: str) -> str:
    """A layers x grid heatmap of accuracy drop (points), as a base64 PNG data URI. `analysis` is
    {"baseline": accuracy, "curves": {layer: [[value, accuracy], ...]}}; with "chosen" ({layer: value})
    each layer's chosen value is written in its row label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(analysis["curves"])
    grid = [v for v, _ in analysis["curves"][names[0]]]
    drops = [[100 * (analysis["baseline"] - acc) for _, acc in analysis["curves"][n]] for n in names]
    chosen = analysis.get("chosen") or {}
    labels = [f"{n} (chosen {chosen[n]:.2f})" if n in chosen else n for n in names]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(grid) + (1.2 if chosen else 0), 0.9 + 0.42 * len(names)))
    im = ax.imshow(drops, cmap="Reds", vmin=0, vmax=max(5.0, max(max(r) for r in drops)), aspect="auto")
    ax.set_xticks(range(len(grid)), [str(g) for g in grid])
    ax.set_yticks(range(len(names)), labels)
    ax.set_xlabel(value_label)
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(drops):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v > 3 else "black")
    fig.colorbar(im, ax=ax, label="accuracy drop (points)")
    return figure_png(fig)


def _scatter(stages: list[dict], x_of, xlabel: str, title: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for s in stages:
        m = s.get("metrics") or {}
        acc = m.get("accuracy")
        if acc is None and m.get("fidelity"):
            acc = m["fidelity"].get("top1_agreement") or m["fidelity"].get("cosine_mean")
        x = x_of(m)
        if acc is not None and x:
            points.append((x, 100 * acc, s["name"], s.get("simulated")))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, y, name, simulated in points:
        ax.scatter([x], [y], s=50, marker="x" if simulated else "o")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy / agreement (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return figure_png(fig)


def _other_runtimes(stages: list[dict]) -> list[tuple[str, int, str]]:
    """(runtime, batch, note) of latency rows beyond torch/ONNX Runtime that any stage measured (OpenVINO,
    ExecuTorch, LiteRT), in a stable order; the note says where a phone runtime was timed."""
    found: dict[tuple[str, int], str] = {}
    for s in stages:
        for row in (s.get("metrics") or {}).get("latency", []) or []:
            if not row["runtime"].startswith(("torch", "onnxruntime")):
                found.setdefault((row["runtime"], row["batch_size"]), row.get("note", ""))
    return [(rt, b, note) for (rt, b), note in sorted(found.items())]


def stage_table(stages: list[dict]) -> str:
    base = stages[0]["metrics"] if stages else {}
    base_size = base.get("size_bytes")
    base_acc = base.get("accuracy")
    others = _other_runtimes(stages)
    extra_head = "".join(f"<th>{html.escape(rt)} ms b{b}" + (f"<br><small>{html.escape(note)}</small>" if note else "") + "</th>"
                         for rt, b, note in others)
    head = ("<tr><th class=l>stage</th><th>accuracy</th><th>&Delta; pts</th><th>params (non-zero)</th><th>MACs</th>"
            "<th>bytes on disk</th><th>&times; smaller</th><th>torch ms b1</th><th>torch ms b64</th>"
            f"<th>ORT ms b1</th><th>ORT ms b64</th>{extra_head}<th class=l>artifact / notes</th></tr>")
    rows = [head]
    for s in stages:
        m = s.get("metrics") or {}
        acc = m.get("accuracy")
        delta = "" if acc is None or base_acc is None else f"{100 * (acc - base_acc):+.2f}"
        size = m.get("size_bytes")
        ratio = f"{base_size / size:.1f}" if size and base_size else ""
        lat = [_latency_row(m, rt, b) for rt, b in (("torch", 1), ("torch", 64), ("onnxruntime", 1), ("onnxruntime", 64))]
        lat += [_latency_row(m, rt, b) for rt, b, _ in others]
        notes = [html.escape(n) for n in s.get("notes", [])]
        if s.get("simulated"):
            notes.insert(0, "<span class=sim>simulated: not a real speed/size result</span>")
        if s.get("error"):
            notes.insert(0, f"<span class=err>failed: {html.escape(s['error'])}</span>")
        art = html.escape(Path(s["artifact"]).name) if s.get("artifact") else ""
        fid = m.get("fidelity") or {}
        acc_txt = "" if acc is None else f"{100 * acc:.2f}%"
        if not acc_txt and fid:
            acc_txt = ", ".join(f"{k} {v:.4f}" for k, v in fid.items())
        rows.append(
            f"<tr><td class=l><b>{html.escape(s['name'])}</b><br><small>{html.escape(s.get('technique') or '')}</small></td>"
            f"<td>{acc_txt}</td><td>{delta}</td>"
            f"<td>{_fmt_int(m.get('params'))}<br><small>({_fmt_int(m.get('nonzero_params'))})</small></td>"
            f"<td>{_fmt_int(m.get('macs'))}</td><td>{_fmt_int(size)}</td><td>{ratio}</td>"
            + "".join(latency_cell(row) for row in lat)
            + f"<td class=l>{art}<br><small>{'<br>'.join(notes)}</small></td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _section(name: str, content: Any) -> str:
    if isinstance(content, dict) and "html" in content:
        body = content["html"]  # already-rendered, trusted HTML produced by slimkit itself
    elif isinstance(content, list) and content and all(isinstance(r, dict) for r in content):
        keys = list(dict.fromkeys(k for r in content for k in r))  # e.g. constraints: one row each

        def cell(v: Any) -> str:
            if isinstance(v, bool):
                return "yes" if v else "<b>NO</b>"
            return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

        body = ("<table><tr>" + "".join(f"<th>{html.escape(str(k))}</th>" for k in keys) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{cell(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in content)
                + "</table>")
    else:
        import json

        body = f"<pre>{html.escape(json.dumps(content, indent=2, default=str))}</pre>"
    return f"<h2>{html.escape(name)}</h2>{body}"


def noise_reasons(stages: list[dict], env: dict) -> list[str]:
    """Why the latency figures of `stages` may not be trusted as ratios (empty when nothing is wrong): runs
    that spread more than NOISY_SPREAD, side-by-side rounds that disagree with each other, a loaded machine."""
    rows = [r for s in stages for r in (s.get("metrics") or {}).get("latency", []) or []]
    noisy = [r for r in rows if _noisy(r)]
    split = [r for r in rows if r.get("vs_baseline") and not r["vs_baseline"]["reliable"]]
    load, cores = env.get("load_average_1m"), env.get("cpu_count")
    why = []
    if noisy:
        why.append(f"{len(noisy)} of {len(rows)} latency measurements spread more than {NOISY_SPREAD}x between runs")
    if split:
        why.append(f"for {len(split)} of them the interleaved rounds disagree on whether it is faster or slower than "
                   "the baseline (shown as ~1x)")
    if load is not None and cores and load > 0.75 * cores:
        why.append(f"the machine's load average was {load:.1f} on {cores} cores when the report was made")
    return why


def _noise_warning(stages: list[dict], env: dict) -> str:
    why = noise_reasons(stages, env)
    if not why:
        return ""
    return ("<div class='card warn'><b>Noisy timing:</b> " + html.escape("; ".join(why))
            + ". Compare latencies as ratios within one run, and rerun on a quiet machine before trusting a speed-up."
            "</div>")


def stage_sections(stages: list[dict]) -> str:
    """The sections techniques render from what their stages reported (`Technique.sections`: payload
    key -> renderer of one stage entry), in stage order."""
    from slimkit.core.registry import report_sections

    renderers = report_sections()
    return "".join(render(s) for s in stages for key, render in renderers.items() if s.get(key))


def render_html(result: dict[str, Any]) -> str:
    stages = result.get("stages", [])
    ok = [s for s in stages if not s.get("error")]
    size_plot = _scatter(ok, lambda m: m.get("size_bytes"), "bytes on disk (log)", "accuracy vs size")
    lat_plot = _scatter(ok, lambda m: _latency(m, "onnxruntime", 64) or _latency(m, "torch", 64),
                        "latency ms, batch 64, 1 thread (log; ORT where measured, else torch)", "accuracy vs latency")
    plots = "".join(f'<img alt="plot" src="{p}">' for p in (size_plot, lat_plot) if p)
    env = result.get("environment", {})
    env_rows = "".join(f"<tr><td class=l>{html.escape(str(k))}</td><td class=l>{html.escape(str(v))}</td></tr>"
                       for k, v in env.items())
    model, data = result.get("model", {}), result.get("data", {})
    sections = stage_sections(stages) + "".join(_section(k, v) for k, v in (result.get("sections") or {}).items())
    title = f"slimkit report: {html.escape(str(model.get('name', 'model')))} on {html.escape(str(data.get('name', 'data')))}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>
<body>
<h1>{title}</h1>
<p class=sub>created {html.escape(str(result.get('created', '')))} &middot; schema {html.escape(str(result.get('schema', '')))}</p>
<div class=card>Sizes are bytes of the file each stage actually wrote. Latencies are medians after warm-up on the
named runtime and thread count, with the p10&ndash;p90 range of the runs below each; a <span class=noisy>shaded</span>
cell spread more than {NOISY_SPREAD}x, so a speed ratio computed from it is not reliable. Stages marked
<span class=sim>simulated</span> only emulate a format on this CPU and claim no size or speed.</div>
{_noise_warning(stages, env)}
<h2>Stages</h2>
{stage_table(stages)}
<h2>Trade-offs</h2>
<div class=plots>{plots or '<p>no plottable stages</p>'}</div>
{sections}
<h2>Environment</h2>
<table>{env_rows}</table>
</body></html>
"""


def write_html(result: dict[str, Any], path: str | Path) -> Path:
    return write_text(path, render_html(result))

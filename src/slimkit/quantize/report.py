"""The quantization family's report section: which tensors carry the quantization error (`blame=True`)."""
from __future__ import annotations

import html

from slimkit.report.html import figure_png


def blame_chart(result: dict, top: int = 12) -> str:
    """Horizontal bars: output SQNR gain (dB) if each of the `top` worst tensors (activations red,
    layer weights blue) were float."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"][:top][::-1]
    labels = [r["tensor"] if len(r["tensor"]) <= 60 else r["tensor"][:57] + "..." for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(rows)))
    colors = ["#2c6fbb" if r.get("kind") == "weights" else "#c0392b" for r in rows]
    ax.barh(range(len(rows)), [r["gain_db"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("output SQNR gain if this tensor were float (dB); red: activation, blue: weights")
    title = [f"output SQNR {result['sqnr_db']:.1f} dB"]
    if result.get("weights_only_sqnr_db") is not None:
        title.append(f"activations float: {result['weights_only_sqnr_db']:.1f} dB")
    if result.get("activations_only_sqnr_db") is not None:
        title.append(f"weights float: {result['activations_only_sqnr_db']:.1f} dB")
    ax.set_title("; ".join(title), fontsize=10)
    return figure_png(fig)


def blame_section(stage: dict) -> str:
    """A bar chart of the stage's blame measurement (`QuantConfig(blame=True)`)."""
    if not (stage.get("blame") or {}).get("rows"):
        return ""
    return (f"<h2>which tensor is to blame: {html.escape(str(stage.get('name')))}</h2>"
            f'<div class=plots><img alt="blame chart" src="{blame_chart(stage["blame"])}"></div>'
            "<p class=sub>Each bar puts one tensor back in float (an activation quantizer switched off, "
            "or one layer's weights unrounded), the rest as deployed, and measures the output's SQNR "
            "against the float model on a calibration batch; the title gives the SQNR with every "
            "activation, and with every weight, in float.</p>")

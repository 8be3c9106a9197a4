"""The pruning family's report section: per-layer sensitivity curves as a heatmap."""
from __future__ import annotations

import html

from slimkit.report.html import heatmap


def sensitivity_section(stage: dict) -> str:
    """A heatmap of the stage's measured per-layer sensitivity (`PruneConfig(scope="sensitivity")`)."""
    sens = stage.get("sensitivity") or {}
    if not sens.get("curves"):
        return ""
    image = heatmap(sens, "accuracy drop vs sparsity (one layer at a time, validation split)", "sparsity")
    return (f"<h2>per-layer sensitivity: {html.escape(str(stage.get('name')))}</h2>"
            f'<div class=plots><img alt="sensitivity heatmap" src="{image}"></div>'
            "<p class=sub>Each row prunes one layer alone; the allocation under the global target "
            "prunes robust, large layers most (the chosen sparsity is in the row label).</p>")

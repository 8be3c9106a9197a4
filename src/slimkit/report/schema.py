"""The result schema, written as `result.json`.

    {"schema": "slimkit-result/1", "created": ISO-8601, "model": {...}, "data": {...},
     "environment": {...}, "stages": [stage, ...], "sections": {name: any}}

A stage: {"name", "technique", "family", "config", "metrics" (evaluate.Metrics as dict),
"artifact", "runtime", "simulated" (bool), "notes" [str], "error" (str or null),
"seconds" (wall time of the technique)}, and where the technique measured them "sensitivity"
(per-layer curves, prune scope="sensitivity") and "blame" (each quantized activation's and layer weights' share of the
output error, quantize blame=True). Later features add named `sections` (sensitivity, Pareto fronts,
recommendation) without changing the stage format.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from slimkit.core.io import write_text

SCHEMA = "slimkit-result/1"


def environment(threads: int | None = None) -> dict[str, Any]:
    import torch

    import slimkit

    env = {"slimkit": slimkit.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
           "torch_threads": threads or torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import os

        env["cpu_count"] = os.cpu_count()
        env["load_average_1m"] = round(os.getloadavg()[0], 2)  # a loaded machine makes latencies noisy
    except Exception:
        pass
    from slimkit.core.cpu import cpu_isa

    env["cpu_isa"] = cpu_isa()  # int8 results and speed depend on it: recorded with every figure
    return env


def new_result(model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": model, "data": data, "environment": environment(), "stages": [], "sections": {}}


def stage_entry(name: str, *, technique: str | None = None, family: str | None = None, config: dict | None = None,
                metrics: dict | None = None, artifact: str | None = None, runtime: str = "torch",
                simulated: bool = False, notes: list[str] | None = None, error: str | None = None,
                seconds: float | None = None) -> dict[str, Any]:
    return {"name": name, "technique": technique, "family": family, "config": config or {}, "metrics": metrics or {},
            "artifact": artifact, "runtime": runtime, "simulated": simulated, "notes": list(notes or []),
            "error": error, "seconds": seconds}


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    return write_text(path, json.dumps(result, indent=2, default=str))

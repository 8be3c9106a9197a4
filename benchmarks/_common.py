"""Helpers shared by the benchmark scripts: environment record, table printing, JSON output.

Every script writes `{"benchmark", "environment", "rows", "checks"}` (DESIGN.md, performance
protocol); checks are computed from the rows of the same run, and the script exits 0 even when a
check fails. `benchmarks/results_md.py` turns the current JSONs into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


def environment(**extra: Any) -> dict[str, Any]:
    """What the numbers depend on: versions, CPU, threads, load on the (shared) machine."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # what benchmarks/results_md.py shows as the command that wrote the JSON
        "command": " ".join([*(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "SLIMKIT_PROGRESS") if k in os.environ),
                             ".venv/bin/python", *(shlex.quote(a) for a in sys.argv)]),
    }
    from slimkit.core.cpu import cpu_isa

    env["cpu_isa"] = cpu_isa()  # int8 accuracy and speed depend on it (AVX2 vs VNNI vs ARM)
    env.update(extra)
    return env


def latency_fields(stats: dict[str, Any], name: str) -> dict[str, Any]:
    """A `compare_latency` figure as row fields: `name` (the median, ms) with its p10 and p90."""
    return {name: stats["median_ms"], f"{name}_p10": stats["p10_ms"], f"{name}_p90": stats["p90_ms"]}


def check(name: str, value: Any, target: str, ok: bool) -> dict[str, Any]:
    """One acceptance check; `value` and `ok` must come from this run's rows."""
    return {"name": name, "value": value, "target": target, "ok": bool(ok)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: Iterable[dict[str, Any]], columns: list[str] | None = None, title: str | None = None) -> None:
    """Plain-text table of `rows` (dicts) with the given columns (default: keys of the first row)."""
    rows = list(rows)
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def run_parts(parts: dict[str, Callable[[], None]], requested: list[str], checks: list[dict[str, Any]]) -> int:
    """Run the requested benchmark parts in order: an unknown name is a usage error (returns 2); a part that
    raises is a finding (its traceback printed, a failed "ran" check), and the others still run. Returns 0."""
    import sys
    import traceback

    unknown = [p for p in requested if p not in parts]
    if unknown:
        print(f"unknown part {unknown[0]!r}; known: {', '.join(parts)}", file=sys.stderr)
        return 2
    for part in requested:
        t0 = time.perf_counter()
        try:
            parts[part]()
        except Exception as err:
            traceback.print_exc()
            checks.append(check(f"{part}: ran", f"{type(err).__name__}: {err}", "no error", False))
        print(f"[{part}] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def write_result(out: str | Path, benchmark: str, env: dict[str, Any], rows: list[dict[str, Any]],
                 checks: list[dict[str, Any]], **extra: Any) -> Path:
    """Write the benchmark JSON atomically and print the checks. `extra`: more top-level keys (e.g. the
    detailed rows a summary table was made from)."""
    from slimkit.core.io import write_text

    result = {"benchmark": benchmark, "environment": env, "rows": rows, "checks": checks, **extra}
    path = write_text(out, json.dumps(result, indent=2, default=str))
    print_table(checks, ["name", "value", "target", "ok"], title="checks")
    print(f"\nwrote {path}")
    return path

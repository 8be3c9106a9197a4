"""Cost model of NAS candidates: exact parameters and MACs, latency predicted from a lookup table.

The latency table holds, for every distinct unit (stem, MBConv block, cell, head at a given input
shape), its median latency measured once on the target runtime ("torch" eager or "ort" ONNX
Runtime) with a fixed thread count and batch size. A candidate's predicted latency is the sum of its
units' entries times a `scale` calibrated on a few end-to-end measurements (running units back to back
costs a little more than running each alone: caches, dispatch), and `check_table` compares
predictions with end-to-end measurements of *other* candidates. Unknown units are measured on first
use; the table is saved and reloaded as JSON.

`statistic` is "p10_ms" (10th percentile) by default: a long end-to-end run is interrupted more often
than a short per-unit one, which biases end-to-end medians above the sum of per-unit medians. Measured
on digits candidates (benchmarks/RESULTS.md, nas): on a quiet machine the p10 table predicted 18 of 20
candidates within 15%, the median table 14; under load 17 vs 8. "median_ms" (the protocol of reported
latencies) stays available; the statistic is recorded in the table so nobody mistakes one for the other.

On a shared machine whose speed drifts over seconds, one pass of measurements can put a slow spell on
one side of a comparison only. `measure_rounds` / `check_table(..., rounds=k, calibration=...)` time
every unit and every model in one `compare_latency` call of k interleaved rounds (the project's one
latency protocol); calibration and check share the rounds. Session 4 on this 2-core VM (another job on the other core):
single pass, p10 table 1/20 candidates within 15%; 5 rounds, 20/20 in 4 of 5 runs.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field

from slimkit.core.config import Config
from slimkit.core.io import write_text
from slimkit.errors import ConfigError, InfeasibleError
from slimkit.evaluate import count_macs, count_params
from slimkit.evaluate.latency import Workload, compare_latency, measure_latency, ort_call, torch_call, torch_threads

RUNTIMES = ("torch", "ort")
COST_KEY = {"macs": "macs", "params": "param_count", "latency": "latency_ms_predicted"}  # objective -> row field
STATISTICS = ("median_ms", "p10_ms")


class Constraints(Config):
    """Hard limits a candidate must meet (None: no limit). MACs and params are counted exactly;
    latency is the lookup table's prediction in milliseconds."""

    max_macs: int | None = Field(None, gt=0)
    max_params: int | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)

    def budget_gap(self, costs: dict[str, float], objective: str) -> float:
        """|cost / limit - 1| for the objective's own limit (0.0 without one): how far a candidate is
        from spending its budget, the cost term of TuNAS's absolute reward (Bender et al. 2020)."""
        key, limit = {"macs": ("macs", self.max_macs), "params": ("params", self.max_params),
                      "latency": ("latency_ms", self.max_latency_ms)}[objective]
        if limit is None or key not in costs:
            return 0.0
        return abs(costs[key] / limit - 1.0)

    def reward(self, accuracy: float, costs: dict[str, float], objective: str, cost_weight: float) -> float:
        """TuNAS's absolute reward: accuracy - cost_weight * budget_gap (the RL controller's reward,
        in the real trials and in the one-shot warm-up alike)."""
        return accuracy - cost_weight * self.budget_gap(costs, objective) if cost_weight else accuracy

    def violations(self, costs: dict[str, float]) -> list[str]:
        """One line per violated limit, naming the limit and the candidate's value."""
        out = []
        if self.max_macs is not None and costs["macs"] > self.max_macs:
            out.append(f"max_macs={self.max_macs:,} (candidate needs {costs['macs']:,})")
        if self.max_params is not None and costs["params"] > self.max_params:
            out.append(f"max_params={self.max_params:,} (candidate has {costs['params']:,})")
        if self.max_latency_ms is not None and costs.get("latency_ms", 0.0) > self.max_latency_ms:
            out.append(f"max_latency_ms={self.max_latency_ms:g} (candidate predicted {costs['latency_ms']:.3f} ms)")
        return out


class LatencyTable:
    """Per-unit latency lookup table for one runtime, thread count and batch size.

        table = LatencyTable("torch", threads=1, batch_size=1)
        table.predict(model)             # ms; measures units it has not seen yet
        table.save("latency_table.json")
    """

    def __init__(self, runtime: str = "torch", *, threads: int = 1, batch_size: int = 1, runs: int = 30,
                 statistic: str = "p10_ms", scale: float = 1.0, entries: dict[str, float] | None = None):
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown latency runtime {runtime!r}; use one of: {', '.join(RUNTIMES)}")
        if statistic not in STATISTICS:
            raise ConfigError(f"unknown latency statistic {statistic!r}; use one of: {', '.join(STATISTICS)}")
        self.runtime, self.threads, self.batch_size, self.runs = runtime, threads, batch_size, runs
        self.statistic, self.scale = statistic, scale
        self.entries: dict[str, float] = dict(entries or {})
        self.measured = 0  # entries measured by this process (how much the table cost to build)

    def unit_ms(self, key: str, unit: nn.Module, shape: tuple[int, ...]) -> float:
        """The table entry for `key`, measuring `unit` on a random input of `shape` if missing."""
        if key not in self.entries:
            self.entries[key] = self._measure(unit, shape)
            self.measured += 1
        return self.entries[key]

    def _workload(self, unit: nn.Module, shape: tuple[int, ...], tmp: Path) -> Workload:
        """`unit` on a random input of `shape` on the table's runtime (ONNX files go to `tmp`)."""
        unit = unit.eval()
        example = torch.randn(self.batch_size, *shape)
        if self.runtime == "torch":
            return torch_call(unit, example, threads=self.threads)
        from slimkit.export.onnx import export_onnx

        path = export_onnx(unit, tmp / f"unit-{sum(1 for _ in tmp.iterdir())}.onnx", example)
        return ort_call(path, example, threads=self.threads)

    def _measure(self, unit: nn.Module, shape: tuple[int, ...]) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return measure_latency(self._workload(unit, shape, Path(tmp)), warmup=5, runs=self.runs)[self.statistic]

    def units_sum(self, model: nn.Module) -> float:
        """Sum of the table entries of a `SearchNet`'s units (ms), measuring missing ones."""
        if not hasattr(model, "unit_keys"):
            raise ConfigError(f"latency prediction needs a NAS SearchNet, got {type(model).__name__}")
        return sum(self.unit_ms(k, u, s) for k, u, s in zip(model.unit_keys, model.units, model.unit_shapes))

    def predict(self, model: nn.Module) -> float:
        """Predicted end-to-end latency (ms) of a `SearchNet`: `scale` x the sum of its units' entries."""
        return self.scale * self.units_sum(model)

    def calibrate(self, models: list[nn.Module], *, rounds: int = 1) -> float:
        """Set `scale` to the median ratio of measured end-to-end latency to the sum of unit entries
        over `models` (use candidates other than those you check the table on). Returns the scale.
        `rounds` > 1: see `measure_rounds`."""
        if not models:
            raise ConfigError("latency calibration needs at least one model")
        return self._set_scale(models, self.measure_rounds(models, rounds))

    def _set_scale(self, models: list[nn.Module], measured: list[float]) -> float:
        """`scale` = median over `models` of measured end-to-end latency / sum of unit entries."""
        import statistics

        self.scale = float(statistics.median(e / self.units_sum(m) for e, m in zip(measured, models)))
        return self.scale

    def measure_rounds(self, models: list[nn.Module], rounds: int = 1) -> list[float]:
        """End-to-end latency of each model (ms), measured with its units in one `compare_latency` call of
        `rounds` interleaved rounds (about `runs` runs of each in all): missing table entries are filled
        and, with `rounds` > 1, existing ones lowered to this call's figure when it is smaller. On a shared
        machine whose speed drifts over seconds, a slow spell then no longer lands on one side of a
        table-vs-end-to-end comparison."""
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        with tempfile.TemporaryDirectory() as tmp:
            calls: dict[Any, Workload] = {}
            for model in models:
                for key, unit, shape in zip(model.unit_keys, model.units, model.unit_shapes):
                    if key not in calls and (key not in self.entries or rounds > 1):
                        calls[key] = self._workload(unit, shape, Path(tmp))
            for i, model in enumerate(models):
                calls[("model", i)] = self._workload(model, tuple(model.unit_shapes[0]), Path(tmp))
            stats = compare_latency(calls, rounds=rounds, min_runs=max(1, -(-self.runs // rounds)),
                                    round_time_s=0.0, warmup=5)
        for key in calls:
            if isinstance(key, str):
                new = stats[key][self.statistic]
                self.measured += key not in self.entries
                self.entries[key] = min(self.entries.get(key, new), new)
        return [stats[("model", i)][self.statistic] for i in range(len(models))]

    def measure_end_to_end(self, model: nn.Module) -> float:
        """Measured end-to-end latency (ms) of `model` on the table's runtime, threads and batch."""
        return self._measure(model, tuple(model.unit_shapes[0]))

    def info(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "threads": self.threads, "batch_size": self.batch_size,
                "runs": self.runs, "statistic": self.statistic, "scale": self.scale, "entries": len(self.entries)}

    def to_dict(self) -> dict[str, Any]:
        import slimkit

        versions = {"torch": torch.__version__, "slimkit": slimkit.__version__}
        if self.runtime == "ort":
            import onnxruntime

            versions["onnxruntime"] = onnxruntime.__version__
        return {"format": "slimkit-latency-table/1", **self.info(), "versions": versions, "table": self.entries}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON atomically, merging entries already in the file (other workers')."""
        path = Path(path)
        if path.is_file():
            try:
                old = load_table(path)
                if (old.runtime, old.threads, old.batch_size, old.statistic) == (
                        self.runtime, self.threads, self.batch_size, self.statistic):
                    self.entries = {**old.entries, **self.entries}
            except ConfigError:
                pass  # a corrupt table is replaced, not merged
        return write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))


def load_table(path: str | Path) -> LatencyTable:
    """Read a table written by `LatencyTable.save`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return LatencyTable(data["runtime"], threads=int(data["threads"]), batch_size=int(data["batch_size"]),
                            runs=int(data.get("runs", 30)), statistic=data.get("statistic", "median_ms"),
                            scale=float(data.get("scale", 1.0)), entries={k: float(v) for k, v in data["table"].items()})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a slimkit latency table ({err})") from None


class CostModel:
    """Costs of specs (params, MACs, predicted latency), cached by spec, and the constraint check."""

    def __init__(self, constraints: Constraints | None = None, table: LatencyTable | None = None):
        self.constraints = constraints or Constraints()
        self.table = table
        self._cache: dict[str, dict[str, float]] = {}

    def costs(self, spec: dict[str, Any]) -> dict[str, float]:
        """{"params", "macs" (batch 1), "latency_ms" (predicted; only with a table)} of a spec."""
        from slimkit.search.space import build

        key = json.dumps(spec, sort_keys=True)
        if key not in self._cache:
            model = build(spec)
            with torch_threads(1):  # batch-1 counting pass: extra threads only add hand-off cost
                c: dict[str, float] = {"params": count_params(model)["params"],
                                       "macs": count_macs(model, torch.zeros(1, *model.unit_shapes[0]))}
            if self.table is not None:
                c["latency_ms"] = self.table.predict(model)
            self._cache[key] = c
        return self._cache[key]

    def violations(self, spec: dict[str, Any]) -> list[str]:
        return self.constraints.violations(self.costs(spec))

    def feasible(self, spec: dict[str, Any]) -> bool:
        return not self.violations(spec)

    def check_space(self, space) -> dict[str, float]:
        """Raise `InfeasibleError` naming each limit that even the space's cheapest candidate breaks."""
        cheapest = space.spec(space.cheapest())
        bad = self.violations(cheapest)
        if bad:
            raise InfeasibleError(
                f"no candidate of the {space.kind} space can meet " + "; ".join(bad).replace("candidate", "the cheapest candidate")
                + ": relax the limit or enlarge the space (smaller widths, depths, kernels or expansions)")
        return self.costs(cheapest)


def check_table(table: LatencyTable, models: list[nn.Module], *, tolerance: float = 0.15, rounds: int = 1,
                calibration: list[nn.Module] | None = None) -> list[dict[str, float]]:
    """Predicted vs measured end-to-end latency for each model: rows with both, the relative error
    and whether it is within `tolerance`. `rounds` > 1 measures units and models in interleaved rounds
    (`LatencyTable.measure_rounds`). `calibration`: other models to set the table's `scale` from,
    measured in the same rounds (so the scale and the check see the machine at the same moments)."""
    calibration = list(calibration or [])
    measured = table.measure_rounds(calibration + list(models), rounds)
    if calibration:
        table._set_scale(calibration, measured[:len(calibration)])
    rows = []
    for model, m in zip(models, measured[len(calibration):]):
        predicted = table.predict(model)
        error = abs(predicted - m) / m
        rows.append({"predicted_ms": predicted, "measured_ms": m, "relative_error": error,
                     "within_tolerance": error <= tolerance})
    return rows

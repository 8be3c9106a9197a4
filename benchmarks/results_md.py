"""Write benchmarks/RESULTS.md from the benchmark JSONs: the current figures, one section per benchmark.

    .venv/bin/python benchmarks/results_md.py            # rewrite benchmarks/RESULTS.md
    .venv/bin/python benchmarks/results_md.py --check    # exit 1 when RESULTS.md is not what the JSONs say

Each entry of `CURRENT` names a JSON in benchmarks/results/ that holds a benchmark's current figures and
the command that wrote it (a JSON that records its own `environment.command` uses that). For each, the page
shows the command, the machine (CPU, ISA flags, load when it started), the acceptance checks and the rows,
exactly as the JSON has them. What the figures mean, how they were reached and what was tried before are
in docs/notes/benchmarks.md and the git history; a JSON that is no longer current is deleted (git keeps it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE / "RESULTS.md"
PY = "SLIMKIT_PROGRESS=0 .venv/bin/python benchmarks/"
MAX_ROWS = 60
LABEL_KEYS = ("variant", "method", "case", "model", "strategy", "name", "part")
GROUP_KEYS = ("part", "section")

# (benchmark section, JSON file, command when the JSON does not record its own[, what it stands for])
CURRENT = [
    ("quantize", "quantize-effnet.json", f"OMP_NUM_THREADS=1 {PY}quantize.py --parts effnet --out benchmarks/results/quantize-effnet.json"),
    ("quantize", "quantize-cnn-minilm.json", f"OMP_NUM_THREADS=1 {PY}quantize.py --parts cnn,minilm --out benchmarks/results/quantize-cnn-minilm.json"),
    ("quantize", "quantize-minilm.json", f"OMP_NUM_THREADS=1 {PY}quantize.py --parts minilm --out benchmarks/results/quantize-minilm.json"),
    ("quantize", "quantize-lowbit.json", f"OMP_NUM_THREADS=1 {PY}quantize.py --parts lowbit --out benchmarks/results/quantize-lowbit.json"),
    ("deploy", "deploy.json", f"{PY}deploy.py --out benchmarks/results/deploy.json"),
    ("prune", "prune-dc-glyphs.json", f"{PY}prune.py --data glyphs --sections deep-compression --artifacts /tmp/pg60 --out benchmarks/results/prune-dc-glyphs.json"),
    ("prune", "prune-unstructured-dc-nm.json", f"{PY}prune.py --sections deep-compression,unstructured,n:m --artifacts /tmp/p4/art --out benchmarks/results/prune-unstructured-dc-nm.json"),
    ("prune", "prune-structured.json", f"OMP_NUM_THREADS=1 {PY}prune.py --sections structured --artifacts /tmp/p15/art --out benchmarks/results/prune-structured.json"),
    ("prune", "prune-heads.json", f"{PY}prune.py --sections heads --out benchmarks/results/prune-heads.json"),
    ("lowrank", "lowrank-mlp.json", f"{PY}lowrank.py --parts mlp --out benchmarks/results/lowrank-mlp.json"),
    ("lowrank", "lowrank-cnn.json", f"OMP_NUM_THREADS=1 {PY}lowrank.py --parts cnn --out benchmarks/results/lowrank-cnn.json"),
    ("distill", "distill-hinton.json", f"{PY}distill.py --skip cache recovery augment --out benchmarks/results/distill-hinton.json"),
    ("distill", "distill-hinton-glyphs.json", f"{PY}distill.py --data glyphs:12000 --skip cache recovery augment --out benchmarks/results/distill-hinton-glyphs.json"),
    ("distill", "distill-recovery.json", f"{PY}distill.py --skip hinton cache augment --threads 1 --out benchmarks/results/distill-recovery.json"),
    ("distill", "distill-augment.json", f"{PY}distill.py --skip hinton cache recovery --out benchmarks/results/distill-augment.json"),
    ("nas", "nas-final15.json", None,
     "The strategies' accuracy check as it stands: each strategy's answer from nas-search.json and the zoo net "
     "retrained with seeds 0-9 for 15 epochs."),
    ("nas", "nas-search.json", None, "The search whose answers nas-final15.json retrains."),
    ("nas", "nas-latency-table.json", None,
     "The latency-table check with the one interleaved latency protocol (it replaces nas.json's latency part)."),
    ("nas", "nas.json", None,
     "The whole benchmark as run in session 4: its 5-epoch accuracy checks and its latency part are superseded "
     "by nas-final15.json and nas-latency-table.json above; its workers, resume and bad-input checks are current."),
    ("nas", "nas-80trials.json", None, "nas.json's search with 80 trials (session 4 protocol)."),
    ("auto", "auto.json", f"{PY}auto.py --out benchmarks/results/auto.json"),
    ("coverage", "coverage.json", f"{PY}coverage.py --budget 55m --cap 90 --out benchmarks/results/coverage.json"),
    ("auto", "auto-glyphs.json", f"{PY}auto.py --data glyphs:10000 --time-budget 10m --presets '' --out benchmarks/results/auto-glyphs.json"),
]


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def _grouped(rows: list[dict]) -> list[str]:
    """One table per part / section of the run (each with only the columns its rows have)."""
    key = next((k for k in GROUP_KEYS if all(k in r for r in rows)), None)
    if key is None:
        return _rows(rows)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append({k: v for k, v in r.items() if k != key})
    if len(groups) == 1:
        return _rows(rows)
    out: list[str] = []
    for value, members in groups.items():
        out += [f"{key} **{value}**:", ""] + _rows(members) + [""]
    return out[:-1]


def _rows(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for r in rows:
        columns += [k for k, v in r.items() if k not in columns and _scalar(v) and v is not None]
    shown = rows[:MAX_ROWS]
    if len(columns) > 12 and len(shown) <= 10:  # wide and short: one column per row
        label = next((k for k in LABEL_KEYS if k in columns), None)
        heads = [_cell(r.get(label)) if label else str(i + 1) for i, r in enumerate(shown)]
        body = [[k] + [_cell(r.get(k)) if _scalar(r.get(k)) else "" for r in shown] for k in columns if k != label]
        lines = _table([label or "row"] + heads, body)
    else:
        lines = _table(columns, [[_cell(r.get(k)) if _scalar(r.get(k)) else "" for k in columns] for r in shown])
    if len(rows) > MAX_ROWS:
        lines.append(f"\n{len(rows) - MAX_ROWS} more rows in the JSON.")
    return lines


def _machine(env: dict) -> str:
    isa = env.get("cpu_isa") or {}
    flags = " ".join(isa.get("flags") or []) or "not recorded"
    parts = [f"{env.get('processor') or isa.get('machine') or '?'}, {env.get('cpu_count', '?')} cores",
             f"ISA flags `{flags}`"]
    if isa.get("int8_accumulation"):
        parts.append(f"int8 accumulation: {isa['int8_accumulation']}")
    if env.get("load_average_1m") is not None:
        parts.append(f"load {env['load_average_1m']:.2f} at start")
    parts.append(f"torch {env.get('torch', '?')}, {env.get('torch_threads', '?')} thread(s)")
    if env.get("started_utc"):
        parts.append(f"started {env['started_utc']}")
    return "; ".join(parts)


def render() -> str:
    out = ["# Benchmark results", "",
           "The current figures of every benchmark, written by `benchmarks/results_md.py` from the JSONs in",
           "`benchmarks/results/` (do not edit by hand: rerun the command shown, then the script). Each JSON's",
           "`checks` are its issue's acceptance figures, computed from the rows of the same run. What the figures",
           "mean and how they were reached: `docs/notes/benchmarks.md`; earlier figures: the git history.", ""]
    section = None
    for name, file, command, *note in CURRENT:
        data = json.loads((RESULTS / file).read_text())
        env = data.get("environment") or {}
        if name != section:
            out += [f"## {name}", ""]
            section = name
        out += [f"### {file}", "", "    " + (env.get("command") or command or "(command not recorded)"), "",
                f"Machine: {_machine(env)}.", ""] + ([note[0], ""] if note else [])
        checks = data.get("checks") or []
        if checks:
            passed = sum(bool(c.get("ok")) for c in checks)
            out += [f"Checks: {passed} of {len(checks)} pass.", ""]
            out += _table(["check", "value", "target", "ok"],
                          [[_cell(c.get("name")), _cell(c.get("value")) if _scalar(c.get("value")) else json.dumps(c.get("value")),
                            _cell(c.get("target")), "pass" if c.get("ok") else "**FAIL**"] for c in checks])
            out.append("")
        if data.get("rows"):
            out += _grouped(data["rows"]) + [""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when RESULTS.md differs from the JSONs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is not what benchmarks/results/*.json say: run benchmarks/results_md.py", file=sys.stderr)
            return 1
        return 0
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(PAGE)
    print(f"wrote {PAGE} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

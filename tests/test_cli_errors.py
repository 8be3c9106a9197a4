"""Every CLI failure a user can cause is one line `error: ...`, exit 2, no traceback, nothing written.

One row per (command, bad input); grow the table whenever a case is found. `{f}` in an argument is
the folder of prepared bad files (see `files`).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import slimkit as sk
from slimkit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "int8.yaml")

CASES = [
    # usage errors: typer/click's own, as one line
    ("bogus", [], "No such command 'bogus'"),
    ("train", [], "Missing argument 'model'"),
    ("train", ["zoo:lenet5", "--epochs", "abc"], "'--epochs'"),
    ("train", ["zoo:lenet5", "--epochs", "0"], "'--epochs'"),
    ("train", ["zoo:lenet5", "--data"], "requires an argument"),
    ("train", ["zoo:lenet5", "--optimizer", "rmsprop", "--out", "{f}/new/m.safetensors"], "optimizer"),
    ("evaluate", ["zoo:lenet5", "--bogus"], "No such option: --bogus"),
    ("evaluate", ["zoo:lenet5", "--threads", "0"], "'--threads'"),
    ("evaluate", ["zoo:lenet5", "--batch-size", "0"], "'--batch-size'"),
    ("evaluate", ["zoo:lenet5", "--batch-size", "x"], "'--batch-size'"),
    ("quantize", [], "Missing argument 'model'"),
    ("prune", ["zoo:lenet5", "--sparsity", "abc"], "'--sparsity'"),
    ("pack", ["zoo:lenet5", "--bits", "many"], "'--bits'"),
    ("factorize", [], "Missing argument 'model'"),
    ("separable", ["zoo:lenet5", "--bogus"], "No such option"),
    ("distill", ["--student", "zoo:lenet5"], "'--teacher'"),
    ("compress", ["zoo:lenet5"], "'--recipe'"),
    ("auto", ["zoo:lenet5", "--trials", "x"], "'--trials'"),
    ("search", ["--trials", "x"], "'--trials'"),
    ("list", ["--bogus"], "No such option"),
    ("env", ["extra"], "unexpected extra argument"),
    ("demo", ["--epochs", "0"], "'--epochs'"),
    ("demo", ["--only", "bogus", "--out", "{f}/demo"], "unknown technique(s) 'bogus'"),
    # model references and files
    ("evaluate", ["{f}/missing.safetensors"], "missing.safetensors"),
    ("evaluate", ["{f}/corrupt.safetensors"], "corrupt.safetensors"),
    ("evaluate", ["{f}/foreign.safetensors"], "not a slimkit model"),
    ("evaluate", ["{f}/corrupt.slim"], "corrupt.slim"),
    ("evaluate", ["{f}/folder"], "not a file"),
    ("evaluate", ["zoo:alexnet"], "alexnet"),
    ("export", ["zoo:lenet5"], "Missing argument 'out'"),
    ("export", ["zoo:lenet5", "{f}/new/m.bad"], "no runtime runs '.bad'"),
    ("export", ["{f}/missing.safetensors", "{f}/new/m.pte"], "missing.safetensors"),
    ("export", ["{f}/corrupt.safetensors", "{f}/new/m.tflite"], "corrupt.safetensors"),
    ("evaluate", ["mypkg.models:net"], "--weights"),
    ("evaluate", ["os:sep", "--weights", "{f}/plain.safetensors"], "not a function"),
    ("evaluate", ["os:getpid", "--weights", "{f}/plain.safetensors"], "returned int"),
    ("evaluate", ["no_such_module_xyz:net", "--weights", "{f}/plain.safetensors"], "cannot import"),
    ("evaluate", ["zoo:lenet5", "--weights", "{f}/missing.safetensors"], "missing.safetensors"),
    ("evaluate", ["zoo:lenet5", "--weights", "{f}/plain.safetensors"], "do not match"),
    ("evaluate", ["{f}/lenet5.safetensors", "--weights", "{f}/plain.safetensors"], "--weights goes with"),
    ("train", ["{f}/corrupt.safetensors", "--out", "{f}/new/m.safetensors"], "corrupt.safetensors"),
    ("prune", ["{f}/missing.safetensors", "--out", "{f}/new/p"], "missing.safetensors"),
    ("pack", ["{f}/corrupt.safetensors", "--out", "{f}/new/m.slim"], "corrupt.safetensors"),
    ("quantize", ["{f}/missing.safetensors", "--out", "{f}/new/q"], "missing.safetensors"),
    ("factorize", ["zoo:alexnet", "--out", "{f}/new/f.safetensors"], "alexnet"),
    ("separable", ["{f}/foreign.safetensors", "--out", "{f}/new/s.safetensors"], "not a slimkit model"),
    ("distill", ["--teacher", "{f}/missing.safetensors", "--student", "zoo:lenet300_100", "--out", "{f}/new/d.safetensors"],
     "missing.safetensors"),
    ("compress", ["{f}/missing.safetensors", "--recipe", RECIPE, "--out", "{f}/new/c"], "missing.safetensors"),
    ("auto", ["{f}/corrupt.safetensors", "--out", "{f}/new/a"], "corrupt.safetensors"),
    ("search", ["--reference", "{f}/missing.safetensors", "--max-macs-ratio", "0.5", "--out", "{f}/new/n"],
     "missing.safetensors"),
    ("list", ["--layers", "{f}/corrupt.safetensors"], "corrupt.safetensors"),
    # data
    ("evaluate", ["zoo:lenet5", "--data", "npz:{f}/empty.npz"], "empty"),
    ("evaluate", ["zoo:lenet5", "--data", "npz:{f}/missing.npz"], "missing.npz"),
    ("evaluate", ["zoo:lenet5", "--data", "npz:{f}/corrupt.npz"], "cannot read npz"),
    ("train", ["zoo:lenet5", "--data", "npz:{f}/nan.npz", "--out", "{f}/new/m.safetensors"], "NaN"),
    ("evaluate", ["{f}/lenet5.safetensors", "--data", "npz:{f}/flat3d.npz"], "cannot run on data set"),
    ("evaluate", ["zoo:lenet5", "--data", "npz:{f}/negative.npz"], "negative label"),
    ("train", ["zoo:lenet5", "--data", "npz:{f}/gap.npz", "--out", "{f}/new/m.safetensors"], "have no example"),
    ("evaluate", ["{f}/lenet5.safetensors", "--data", "npz:{f}/sixteen.npz"], "outputs only 10"),
    ("train", ["{f}/lenet5.safetensors", "--data", "npz:{f}/sixteen.npz", "--out", "{f}/new/m.safetensors"],
     "outputs only 10"),
    ("quantize", ["{f}/lenet5.safetensors", "--data", "npz:{f}/sixteen.npz", "--out", "{f}/new/q"], "outputs only 10"),
    ("evaluate", ["zoo:lenet5", "--data", "bogus"], "unknown data set 'bogus'"),
    ("evaluate", ["zoo:lenet5", "--data", "mnist:{f}/nowhere"], "not found"),
    ("evaluate", ["zoo:lenet5", "--data", "imagefolder:{f}/nowhere"], "not found"),
    ("evaluate", ["zoo:lenet5", "--data", "imagefolder:{f}/folder"], "no images"),
    ("evaluate", ["zoo:lenet5", "--split", "bogus"], "unknown split"),
    ("evaluate", ["zoo:lenet5", "--runtime", "bogus"], "unknown runtime"),
    # output paths that cannot be written: refused before any work
    ("train", ["zoo:lenet5", "--out", "{f}/afile/m.safetensors"], "is a file, not a folder"),
    ("train", ["zoo:lenet5", "--out", "{f}/folder"], "it is a folder"),
    ("evaluate", ["zoo:lenet5", "--json", "{f}/afile/m.json"], "is a file, not a folder"),
    ("quantize", ["{f}/lenet5.safetensors", "--out", "{f}/afile"], "is a file, not a folder"),
    ("prune", ["{f}/lenet5.safetensors", "--out", "{f}/afile/p"], "is a file, not a folder"),
    ("pack", ["{f}/lenet5.safetensors", "--out", "{f}/afile/m.slim"], "is a file, not a folder"),
    ("factorize", ["{f}/lenet5.safetensors", "--out", "{f}/afile/f.safetensors"], "is a file, not a folder"),
    ("separable", ["{f}/lenet5.safetensors", "--out", "{f}/afile/s.safetensors"], "is a file, not a folder"),
    ("distill", ["--teacher", "{f}/lenet5.safetensors", "--student", "zoo:lenet300_100", "--out", "{f}/afile/d.safetensors"],
     "is a file, not a folder"),
    ("compress", ["{f}/lenet5.safetensors", "--recipe", RECIPE, "--out", "{f}/afile"], "is a file, not a folder"),
    ("auto", ["{f}/lenet5.safetensors", "--out", "{f}/afile"], "is a file, not a folder"),
    ("search", ["--out", "{f}/afile"], "is a file, not a folder"),
    ("demo", ["--out", "{f}/afile"], "is a file, not a folder"),
    # configs and recipes
    ("train", ["zoo:lenet5", "--config", "{f}/unknown-key.yaml", "--out", "{f}/new/m.safetensors"], "learning_rate"),
    ("train", ["zoo:lenet5", "--config", "{f}/missing.yaml", "--out", "{f}/new/m.safetensors"], "missing.yaml"),
    ("compress", ["{f}/lenet5.safetensors", "--recipe", "{f}/missing.yaml", "--out", "{f}/new/c"], "missing.yaml"),
    ("compress", ["{f}/lenet5.safetensors", "--recipe", "{f}/malformed.yaml", "--out", "{f}/new/c"], "malformed.yaml"),
    ("compress", ["{f}/lenet5.safetensors", "--recipe", "{f}/unknown-technique.yaml", "--out", "{f}/new/c"], "sharpen"),
    ("quantize", ["{f}/lenet5.safetensors", "--weight-type", "int99", "--out", "{f}/new/q"], "int99"),
    ("quantize", ["{f}/lenet5.safetensors", "--backend", "bogus", "--out", "{f}/new/q"], "--backend"),
    ("quantize", ["{f}/lenet5.safetensors", "--mode", "bogus", "--out", "{f}/new/q"], "mode"),
    ("quantize", ["{f}/lenet5.safetensors", "--config", "{f}/unknown-key.yaml", "--out", "{f}/new/q"], "learning_rate"),
    ("prune", ["{f}/lenet5.safetensors", "--sparsity", "1.5", "--out", "{f}/new/p"], "sparsity"),
    ("prune", ["{f}/lenet5.safetensors", "--pattern", "5:4", "--out", "{f}/new/p"], "5:4"),
    ("pack", ["{f}/lenet5.safetensors", "--out", "{f}/new/m.zip"], "must end in .slim"),
    ("prune", ["{f}/lenet5.safetensors", "--patience", "0", "--out", "{f}/new/p"], "--patience"),
    ("factorize", ["{f}/lenet5.safetensors", "--patience", "soon", "--out", "{f}/new/f.safetensors"], "--patience"),
    ("separable", ["{f}/lenet5.safetensors", "--patience", "-2", "--out", "{f}/new/s.safetensors"], "--patience"),
    ("factorize", ["{f}/lenet5.safetensors", "--energy", "2", "--out", "{f}/new/f.safetensors"], "energy"),
    ("separable", ["{f}/lenet5.safetensors", "--block", "bogus", "--out", "{f}/new/s.safetensors"], "block"),
    ("distill", ["--teacher", "{f}/lenet5.safetensors", "--student", "zoo:lenet300_100", "--temperature", "-1",
                 "--out", "{f}/new/d.safetensors"], "temperature"),
    ("auto", ["{f}/lenet5.safetensors", "--runtime", "bogus", "--out", "{f}/new/a"], "runtime"),
    ("search", ["--space", "bogus", "--out", "{f}/new/n"], "space"),
    ("search", ["--strategy", "bogus", "--out", "{f}/new/n"], "strategy"),
    ("search", ["--workers", "0", "--out", "{f}/new/n"], "workers"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_task):
    from safetensors.torch import save_file

    f = tmp_path_factory.mktemp("bad")
    (f / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (f / "corrupt.slim").write_bytes(b"SLIM\x01garbage")
    save_file({"w": torch.zeros(3)}, str(f / "plain.safetensors"))
    save_file({"w": torch.zeros(3)}, str(f / "foreign.safetensors"), metadata={"other": "tool"})
    (f / "folder").mkdir()
    (f / "afile").write_text("not a folder")
    sk.save(sk.zoo.for_task("lenet5", digits_task, seed=0), f / "lenet5.safetensors")
    x = np.random.default_rng(0).normal(size=(40, 1, 28, 28)).astype(np.float32)
    y = np.arange(40) % 10
    np.savez(f / "empty.npz", x=np.zeros((0, 1, 28, 28), np.float32), y=np.zeros(0, np.int64))
    (f / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    nan = x.copy()
    nan[3, 0, 4, 4] = np.nan
    np.savez(f / "nan.npz", x=nan, y=y)
    np.savez(f / "flat3d.npz", x=x[:, 0], y=y)  # images without their channel axis
    np.savez(f / "negative.npz", x=x, y=y - 1)
    np.savez(f / "gap.npz", x=x, y=np.where(y == 9, 15, y))  # classes 9..14 absent: would build a 16-class model
    np.savez(f / "sixteen.npz", x=np.concatenate([x, x[:16]]), y=np.concatenate([y, np.arange(16)]))
    (f / "unknown-key.yaml").write_text("epochs: 1\nlearning_rate: 0.1\n")
    (f / "malformed.yaml").write_text("stages: [\n  - technique: prune\n")
    (f / "unknown-technique.yaml").write_text("name: x\nstages:\n  - technique: sharpen\n    config: {}\n")
    return f


def test_table_is_large_and_covers_every_command():
    from slimkit.cli.main import _register_technique_commands, app

    _register_technique_commands()
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert len(CASES) >= 60
    assert commands <= {cmd for cmd, _, _ in CASES}, commands - {cmd for cmd, _, _ in CASES}


@pytest.mark.parametrize("command,args,needle", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2(command, args, needle, files, capsys):
    before = {p for p in files.rglob("*")}
    code = main([command, *(a.replace("{f}", str(files)) for a in args)])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in out + err
    written = {p for p in files.rglob("*")} - before
    assert not [p for p in written if p.is_file()], written  # nothing half-written, not even a temp file


def test_version_prints_the_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"slimkit {sk.__version__}"


def test_sigint_during_train_exits_130_with_one_line_and_no_output(tmp_path):
    out = tmp_path / "m.safetensors"
    env = {**os.environ, "SLIMKIT_PROGRESS": "1", "SLIMKIT_PROGRESS_INTERVAL": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimkit.cli.main", "train", "zoo:lenet5", "--epochs", "500",
                             "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until training runs (a progress line), then press Ctrl-C
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("train:"):
            break
    assert lines and lines[-1].startswith("train:"), lines
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    errors = [line for line in rest.splitlines() if line.strip() and not line.startswith("train:")]
    assert proc.returncode == 130, rest
    assert len(errors) == 1 and errors[0].startswith("error: ") and "interrupted" in errors[0], rest
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # no model, no temp file


def test_progress_lines_in_a_log_are_never_blank(tmp_path, digits_task):
    env = {**os.environ, "SLIMKIT_PROGRESS": "1", "SLIMKIT_PROGRESS_INTERVAL": "0.5"}
    run = subprocess.run([sys.executable, "-m", "slimkit.cli.main", "train", "zoo:lenet5", "--epochs", "2",
                          "--out", str(tmp_path / "m.safetensors")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines and all(line.strip() for line in lines), lines
    assert lines[-1].startswith("train: ") and "done in" in lines[-1]
    assert "\x1b" not in run.stderr  # no cursor control in a log


def test_demo_log_has_per_stage_progress_and_no_blank_lines(tmp_path):
    """`slimkit demo > log.txt`: plain progress and per-stage elapsed lines, no blank lines, every technique ran."""
    log = tmp_path / "log.txt"
    env = {**os.environ, "SLIMKIT_PROGRESS": "1", "SLIMKIT_PROGRESS_INTERVAL": "5"}
    with log.open("w") as fh:
        code = subprocess.run([sys.executable, "-m", "slimkit.cli.main", "demo", "--no-advisor", "--epochs", "3",
                               "--out", str(tmp_path / "out")], stdout=fh, stderr=subprocess.STDOUT, env=env,
                              timeout=600).returncode
    lines = log.read_text().splitlines()
    assert code == 0, lines[-5:]
    assert lines and all(line.strip() for line in lines), lines
    assert any(line.startswith("baseline: ") and "done in" in line for line in lines)
    stages = [line for line in lines if line.startswith("stage ")]
    timed = [line for line in lines if re.search(r"\(\d[\dhms]*; \d[\dhms]* so far\)$", line)]  # 12s, 1m05s, 1h02m
    assert len(stages) >= 6 and len(timed) == len(stages), lines  # each stage finished, with its elapsed time
    assert lines[-2].startswith("demo finished in ")
    from slimkit.core import registry

    result = json.loads((tmp_path / "out" / "result.json").read_text())  # every technique's demo config ran
    lenet, digits = sk.zoo.lenet5(), sk.data.digits()
    demo = [t.name for t in registry.techniques() if t.demo is not None and t.demo(lenet, digits) is not None]
    assert [s["technique"] for s in result["stages"][1:]] == demo and not any(s.get("error") for s in result["stages"])
    assert all(r.get("side_by_side") for s in result["stages"] for r in s["metrics"]["latency"])


def test_more_bad_inputs_found_by_probing(files, tmp_path, capsys):
    """Cases found by trying the CLI by hand: CUDA asked on a CPU-only machine, non-integer labels, a random
    teacher; and the note that a zoo model without weights is untrained."""
    np.savez(tmp_path / "floaty.npz", x=np.zeros((20, 1, 28, 28), np.float32), y=np.linspace(0, 1, 20))
    cases = [
        (["train", "zoo:lenet5", "--device", "cuda" if not torch.cuda.is_available() else "tpu",
          "--out", str(tmp_path / "m.safetensors")], "device"),
        (["evaluate", "zoo:lenet5", "--data", f"npz:{tmp_path / 'floaty.npz'}"], "non-integer"),
        (["distill", "--teacher", "zoo:lenet5", "--student", "zoo:lenet300_100", "--out", str(tmp_path / "d.safetensors")],
         "random teacher"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not list(tmp_path.glob("*.safetensors"))
    assert main(["evaluate", "zoo:lenet5", "--runtime", "torch", "--batch-size", "1"]) == 0
    assert "note: zoo:lenet5 has no trained weights" in capsys.readouterr().out

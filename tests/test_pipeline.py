import json
import os
import signal
import subprocess
import sys
import time

import pytest

import slimkit
from slimkit.errors import ConfigError
from slimkit.pipeline.recipe import Recipe, load_recipe

RECIPE = """\
name: test
seed: 1
evaluation:
  runtimes: [torch]
  batch_sizes: [1]
constraints:
  max_accuracy_drop: 50
  max_size_kb: 1000
stages:
  - technique: prune
    config:
      sparsity: 0.5
      recovery: {epochs: 1}
  - technique: prune
    name: more
    config:
      sparsity: 0.8
      recovery: {epochs: 1}
    recovery:
      method: finetune
      epochs: 1
"""


def test_recipe_python_and_yaml_are_the_same_objects():
    from slimkit.prune import PruneConfig

    recipe = load_recipe(RECIPE)
    assert isinstance(recipe.stages[0].technique_config(), PruneConfig)
    assert recipe.stages[1].technique_config().sparsity == 0.8
    again = Recipe.from_stages([PruneConfig(sparsity=0.5, recovery={"epochs": 1})])
    assert again.stages[0].technique_config() == recipe.stages[0].technique_config()
    assert load_recipe(recipe.to_dict()).digest() == recipe.digest()


@pytest.mark.parametrize("edit, needle", [
    (("technique: prune\n    name: more", "technique: prnue\n    name: more"), "unknown technique 'prnue'"),
    (("sparsity: 0.8", "sparsity: 1.5"), "stage 2 (more), line 17: PruneConfig.sparsity"),
    (("sparsity: 0.8", "sparsty: 0.8"), "stage 2 (more), line 17: PruneConfig.sparsty: unknown key"),
    (("{epochs: 1}\n    recovery", "{epochs: many}\n    recovery"), "line 18: PruneConfig.recovery.epochs"),
    (("method: finetune\n      epochs: 1", "method: finetune\n      epochs: -1"), "stage 2 (more), line 21: Stage.recovery.epochs"),
    (("max_size_kb: 1000", "max_size_kib: 1000"), "line 8: Recipe.constraints.max_size_kib: unknown key"),
])
def test_recipe_errors_name_stage_key_and_line(edit, needle):
    bad = RECIPE.replace(*edit)
    assert bad != RECIPE
    with pytest.raises(ConfigError) as err:
        load_recipe(bad)
    assert needle in str(err.value)


def test_recipe_structure_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="non-empty 'stages'"):
        load_recipe("name: x\nstages: []\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe("stages: [\n  - technique: prune\n")


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory, trained_lenet5):
    return slimkit.save(trained_lenet5, tmp_path_factory.mktemp("m") / "lenet5.safetensors")


def _cli(*args, **kw):
    env = {**os.environ, "SLIMKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "slimkit.cli.main", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _metrics(out):
    data = json.loads((out / "result.json").read_text())
    return [(s["name"], s["metrics"]["accuracy"], s["metrics"]["nonzero_params"], s["metrics"]["size_bytes"])
            for s in data["stages"]]


def test_compress_runs_checkpoints_and_is_deterministic(tmp_path, trained_lenet5, digits_task):
    recipe = load_recipe(RECIPE)
    a = slimkit.compress(trained_lenet5, recipe, digits_task, tmp_path / "a")
    slimkit.compress(trained_lenet5, recipe, digits_task, tmp_path / "b")
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")  # same seed, same result
    names = [s["name"] for s in a["stages"]]
    assert names == ["original", "01-prune", "02-more"]
    final = a["stages"][-1]["metrics"]
    assert final["nonzero_params"] <= 0.25 * final["params"]
    assert (tmp_path / "a" / "checkpoints" / "stage-02.safetensors").is_file()
    assert {c["name"] for c in a["sections"]["constraints"]} == {"accuracy drop (points)", "size (KiB)"}
    assert (tmp_path / "a" / "report.html").read_text().count("data:image/png") >= 1


def test_recipe_evaluation_split_is_the_split_evaluated(tmp_path, trained_lenet5, digits_task):
    from slimkit.core.trainer import accuracy

    recipe = load_recipe(RECIPE.replace("  batch_sizes: [1]", "  batch_sizes: [1]\n  split: val"))
    result = slimkit.compress(trained_lenet5, recipe, digits_task, tmp_path / "v")
    val, test = (accuracy(trained_lenet5, digits_task, s) for s in ("val", "test"))
    assert val != test  # the check below can tell the splits apart
    assert result["stages"][0]["metrics"]["accuracy"] == pytest.approx(val)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_kill_mid_stage_then_resume_loses_nothing(sig, tmp_path, trained_file, trained_lenet5, digits_task):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(RECIPE)
    out = tmp_path / "killed"
    args = ["compress", str(trained_file), "--recipe", str(recipe_file), "--out", str(out)]
    proc = _cli(*args)
    state_file = out / "state.json"

    def stages_done() -> int:  # state.json is written atomically after each stage's checkpoint
        return len(json.loads(state_file.read_text())["entries"]) - 1 if state_file.exists() else 0

    deadline = time.time() + 120
    while stages_done() < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert stages_done() == 1 and (out / "checkpoints" / "stage-01.safetensors").exists(), proc.communicate()[1]
    proc.send_signal(sig)  # mid stage 2
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT:  # one line, exit 130, no temp file left behind
        assert proc.returncode == 130, stderr
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
            "error: interrupted (Ctrl-C); no partial output was written"], stderr
        assert "Traceback" not in stderr
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "result.json").exists()
    state = json.loads((out / "state.json").read_text())
    assert len(state["entries"]) == 2  # original + stage 1
    proc = _cli(*args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "resuming: 1 of 2 stages already done" in stdout + stderr  # progress messages go to stderr
    # the same command, never interrupted (same process settings: thread count changes float rounding)
    clean = _cli(*args[:-1], str(tmp_path / "clean"))
    assert clean.wait(timeout=300) == 0
    assert _metrics(out) == _metrics(tmp_path / "clean")


def test_resume_refuses_a_different_recipe(tmp_path, trained_lenet5, digits_task):
    slimkit.compress(trained_lenet5, load_recipe(RECIPE), digits_task, tmp_path / "o")
    other = load_recipe(RECIPE.replace("sparsity: 0.8", "sparsity: 0.7"))
    with pytest.raises(ConfigError, match="different recipe"):
        slimkit.compress(trained_lenet5, other, digits_task, tmp_path / "o")


def test_cli_compress_bad_recipe_one_line(tmp_path, trained_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("sparsity: 0.8", "sparsity: abc"))
    proc = _cli("compress", str(trained_file), "--recipe", str(bad), "--out", str(tmp_path / "o"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip().count("\n") == 0 and "line 17" in stderr and "sparsity" in stderr
    assert not (tmp_path / "o").exists()  # nothing written for an invalid recipe


def test_sensitivity_pruning_stage_reports_its_curves(tmp_path, trained_lenet5, digits_task):
    """A prune stage with scope="sensitivity" carries its per-layer curves and the chosen allocation
    into the stage entry, and the report draws them as a heatmap."""
    recipe = Recipe.from_dict({"name": "sens", "evaluation": {"runtimes": ["torch"], "batch_sizes": [1]}, "stages": [
        {"technique": "prune", "config": {"sparsity": 0.8, "scope": "sensitivity", "recovery": "none",
                                          "sensitivity_grid": [0.5, 0.9, 0.98]}}]})
    result = slimkit.compress(trained_lenet5, recipe, digits_task, tmp_path)
    sens = result["stages"][1]["sensitivity"]
    layers = {"features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"}
    assert set(sens["curves"]) == layers and set(sens["chosen"]) == layers
    assert all([s for s, _ in curve] == [0.5, 0.9, 0.98] for curve in sens["curves"].values())
    total = sum(sens["sizes"].values())  # the allocation meets the global target exactly
    assert abs(sum(sens["chosen"][n] * sens["sizes"][n] for n in layers) / total - 0.8) < 1e-6
    html = (tmp_path / "report.html").read_text()
    assert "per-layer sensitivity: 01-prune" in html and 'alt="sensitivity heatmap"' in html
    assert json.loads((tmp_path / "result.json").read_text())["stages"][1]["sensitivity"]["chosen"] == sens["chosen"]

"""NAS searches on a tiny space (8x8 digits, a few steps per trial): several workers on one storage,
kill-and-resume, export for slimkit.load, CLI errors."""
import json
import multiprocessing
import time

import optuna
import pytest
import torch

import slimkit
from slimkit.errors import ConfigError, InfeasibleError
from slimkit.search.nas import NASConfig, open_storage, search, worker_start_method

TINY_SPACE = {"widths": [0.5], "depths": [1, 2], "kernels": [3, 5], "expansions": [1, 3], "se": [False, True]}


@pytest.fixture(autouse=True)
def one_thread():
    """NAS tests run tiny ops: one thread is faster than two on a loaded 2-core machine."""
    from slimkit.evaluate.latency import torch_threads

    with torch_threads(1):
        yield


def tiny(**kw):
    base = dict(space_options=TINY_SPACE, trials=4, epochs=1, max_steps=2, train_fraction=0.3, population=2,
                sample_size=1)
    return NASConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def small_digits():
    from slimkit import data

    return data.digits(size=8)


def events(out_dir):
    return [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]


def complete_numbers(storage_url, study_name):
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    return sorted(t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_two_workers_share_one_study_no_trial_lost_or_run_twice(small_digits, tmp_path):
    result = search(small_digits, tiny(strategy="evolution", trials=5), out_dir=tmp_path, workers=2, progress=False)
    done = [e for e in events(tmp_path) if e["event"] == "done"]
    started = [e for e in events(tmp_path) if e["event"] == "start"]
    assert sorted(e["trial"] for e in done) == sorted({e["trial"] for e in done})  # none twice
    assert len(done) == 5 and len(started) == 5  # exactly N ran: no surplus trial was trained
    assert len(complete_numbers(result.storage, result.study_name)) == 5
    assert len({(e["host"], e["pid"]) for e in started}) == 2  # both worker processes took trials
    # the chosen architecture is exported for slimkit.load and matches the returned model
    model = slimkit.load(tmp_path / "best.safetensors")
    x = small_digits.example_input(4)
    assert torch.allclose(model(x), result.model.eval()(x), atol=1e-6)
    assert (tmp_path / "pareto.png").stat().st_size > 0
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["best"]["trial"] == result.best["trial"]
    # the chosen one: the best mean validation accuracy among the finalists (the most accurate trials)
    finalists = result.info["finalists"]
    assert len(finalists) == 3 and all(len(f["val_accuracy_seeds"]) == 1 + 3 for f in finalists)  # own run + 3 fresh
    assert all(f["fresh_seeds"] == 3 for f in finalists) and result.best["fresh_seeds"] == 3
    top = sorted((r["val_accuracy"] for r in result.rows if r["state"] == "COMPLETE"), reverse=True)[:3]
    assert sorted((f["val_accuracy_seeds"][0] for f in finalists), reverse=True) == top
    assert abs(result.best["val_accuracy_mean"] - max(f["val_accuracy_mean"] for f in finalists)) < 1e-4
    # ranked on the fresh seeds only: the trial's own (selecting, so lucky) run is not averaged in
    for f in finalists:
        fresh = f["val_accuracy_seeds"][1:]
        assert abs(f["val_accuracy_mean"] - sum(fresh) / len(fresh)) < 1e-4


def test_finalists_are_retrained_once(small_digits, tmp_path, monkeypatch):
    import slimkit.core.trainer as trainer

    cfg = tiny(strategy="random", trials=3, finalists=2, finalist_seeds=1)
    first = search(small_digits, cfg, out_dir=tmp_path, progress=False)
    assert [len(f["val_accuracy_seeds"]) for f in first.info["finalists"]] == [2, 2]
    calls = []
    real_fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    search(small_digits, cfg, out_dir=tmp_path / "fresh", progress=False)
    assert calls  # the patch sees every training the search does (else the check below would pass vacuously)
    calls.clear()
    again = search(small_digits, cfg, out_dir=tmp_path, progress=False)  # the study is complete: nothing to train
    assert calls == [] and again.info["finalists"] == first.info["finalists"]
    assert again.best["trial"] == first.best["trial"]


def _search_forever(task, out_dir, storage):
    search(task, tiny(strategy="random", trials=4, max_steps=3), out_dir=out_dir, storage=storage, progress=False)


def test_killed_search_resumes_and_completes(small_digits, tmp_path):
    ctx = multiprocessing.get_context(worker_start_method())  # spawn once CUDA is in use (GPU machines)
    # an RDB storage here (the journal file is covered above): a writer killed while holding the journal's
    # file lock would make the resume wait out Optuna's 30 s lock grace period
    storage = f"sqlite:///{tmp_path / 'nas.db'}"
    proc = ctx.Process(target=_search_forever, args=(small_digits, tmp_path, storage))
    proc.start()
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once some trials are done and one is running
        evs = events(tmp_path) if (tmp_path / "events.jsonl").exists() else []
        if sum(e["event"] == "done" for e in evs) >= 2 and evs[-1]["event"] == "start":
            break
        time.sleep(0.05)
    proc.kill()
    proc.join()
    before = {e["trial"] for e in events(tmp_path) if e["event"] == "done"}
    assert 2 <= len(before) < 4
    result = search(small_digits, tiny(strategy="random", trials=4, max_steps=3), out_dir=tmp_path, storage=storage,
                    progress=False)
    done = [e["trial"] for e in events(tmp_path) if e["event"] == "done"]
    assert len(done) == 4 and len(set(done)) == 4
    assert before <= set(done)  # finished trials were kept, not re-run
    states = {r["trial"]: r for r in result.rows}
    killed = [r for r in states.values() if r["state"] == "FAIL"]
    assert all(r["failure"] == "worker died" for r in killed)
    assert sum(r["state"] == "COMPLETE" for r in states.values()) == 4


def test_resume_with_other_settings_is_refused(small_digits, tmp_path):
    search(small_digits, tiny(strategy="random", trials=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="different settings"):
        search(small_digits, tiny(strategy="random", trials=2, epochs=2), out_dir=tmp_path, progress=False)


def test_infeasible_budget_and_gradient_on_cell_space(small_digits, tmp_path):
    with pytest.raises(InfeasibleError, match="max_params=10"):
        search(small_digits, tiny(max_params=10), out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="gradient strategy supports the 'mbconv' space"):
        search(small_digits, tiny(space="cell", space_options={}, strategy="gradient"), out_dir=tmp_path,
               progress=False)
    assert not (tmp_path / "best.safetensors").exists()


def test_gradient_supernet_meets_the_budget(small_digits, tmp_path):
    from slimkit.search.cost import Constraints, CostModel
    from slimkit.search.gradient import supernet_search
    from slimkit.search.space import MBConvSpace

    space = MBConvSpace.for_task(small_digits, **{**TINY_SPACE, "widths": [0.5, 1.0]})
    cheapest = CostModel().costs(space.spec(space.cheapest()))["macs"]
    budget = int(cheapest * 1.5)
    cost = CostModel(Constraints(max_macs=budget))
    found = supernet_search(space, small_digits, cost, budget=budget, epochs=1, max_steps=4, progress=False)
    assert cost.feasible(space.spec(found["choices"]))
    for name, probs in found["probabilities"].items():
        assert sum(probs) == pytest.approx(1.0, abs=1e-5), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gradient_supernet_trains_on_cuda(small_digits, monkeypatch):
    from slimkit.search import gradient
    from slimkit.search.cost import CostModel
    from slimkit.search.space import MBConvSpace

    seen = []
    forward = gradient.SuperNet.forward
    monkeypatch.setattr(gradient.SuperNet, "forward",
                        lambda self, x: seen.append((x.device.type, self.alpha_op.device.type)) or forward(self, x))
    space = MBConvSpace.for_task(small_digits, **TINY_SPACE)
    found = gradient.supernet_search(space, small_digits, CostModel(), epochs=1, max_steps=4, progress=False)
    assert set(seen) == {("cuda", "cuda")} and len(seen) > 4  # weight steps and architecture steps
    assert CostModel().feasible(space.spec(found["choices"]))


def test_cli_search_errors_exit_2(capsys, tmp_path):
    from slimkit.cli.main import main

    code = main(["search", "--max-macs", "10", "--trials", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "max_macs=10" in err and "cheapest candidate" in err
    assert main(["search", "--strategy", "annealing", "--out", str(tmp_path)]) == 2


def test_latency_objective_and_limit_use_the_calibrated_table(small_digits, tmp_path):
    from slimkit.search.cost import load_table

    cfg = tiny(strategy="random", trials=2, objective="latency", max_latency_ms=1e4, calibrate_latency=1,
               latency_runs=3)
    result = search(small_digits, cfg, out_dir=tmp_path, progress=False)
    done = [r for r in result.rows if r["state"] == "COMPLETE"]
    assert len(done) == 2 and all(r["latency_ms_predicted"] > 0 for r in done)
    table = load_table(tmp_path / "latency_table.json")
    assert table.scale > 0 and table.statistic == "p10_ms" and table.entries
    assert result.info["latency_table"]["runtime"] == "torch"


def test_nas_technique_runs_as_a_stage_and_reloads(small_digits, tmp_path):
    from slimkit import zoo
    from slimkit.core import registry
    from slimkit.core.state import stages

    technique = registry.get("nas")
    assert technique.demo(None, small_digits) is None  # a search is too slow for the demo
    task = small_digits

    reference = zoo.for_task("mobilenetv2_small", task)
    cfg = tiny(strategy="random", trials=2, max_macs_ratio=0.9)
    model = registry.apply(reference, cfg, task=task, out_dir=str(tmp_path), progress=False)
    assert stages(model)[-1]["technique"] == "nas"
    path = slimkit.save(model, tmp_path / "stage.safetensors")
    again = slimkit.load(path)
    x = task.example_input(3)
    assert torch.allclose(model.eval()(x), again(x), atol=1e-6)
    with pytest.raises(ConfigError, match="needs data"):
        registry.apply(reference, cfg)


def test_a_search_that_learns_nothing_says_so(small_digits, tmp_path, capsys):
    """Constant inputs: no candidate can beat always answering one class. The result, the report and the
    CLI say the search learned nothing (exit 2) instead of exporting a "best" model without a word."""
    from slimkit.cli.main import main
    from slimkit.core.task import tensor_task

    n = len(small_digits.train)
    blank = tensor_task("blank", torch.zeros(n, 1, 8, 8), torch.arange(n) % 10, torch.zeros(60, 1, 8, 8),
                        torch.arange(60) % 10, num_classes=10)
    result = search(blank, tiny(strategy="random", trials=2, finalists=0), out_dir=tmp_path / "lib", progress=False)
    assert "chance level" in result.info["warning"]
    assert "chance level" in (tmp_path / "lib" / "report.md").read_text()
    good = search(small_digits, tiny(strategy="random", trials=2, finalists=0, max_steps=None, epochs=4,
                                     train_fraction=1.0), out_dir=tmp_path / "ok",
                  progress=False)
    assert "warning" not in good.info
    import numpy as np

    np.savez(tmp_path / "blank.npz", x=np.zeros((200, 1, 8, 8), np.float32), y=np.arange(200) % 10,
             x_val=np.zeros((60, 1, 8, 8), np.float32), y_val=np.arange(60) % 10)
    code = main(["search", "--data", f"npz:{tmp_path / 'blank.npz'}", "--strategy", "random", "--trials", "2",
                 "--epochs", "1", "--finalists", "0", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and [line for line in err.splitlines() if line.startswith("error:")][0].count("chance level") == 1

import json
import shutil
import subprocess

import pytest

from slimkit.errors import InfeasibleError
from slimkit.pipeline.advisor import AutoConfig, advise, budget_notes, feasible, pareto_front, score
from slimkit.pipeline.recipe import load_recipe

TINY = dict(trials=3, student_epochs=2, recovery_epochs=1, max_students=1, structured_targets=[0.5], sparsities=[0.8],
            prune_epochs=1, codebook_epochs=0, latency_batch_size=8)


def test_pareto_front_and_feasibility():
    base = {"accuracy": 0.98, "size_bytes": 1000.0, "latency_ms": 1.0}
    a = {"accuracy": 0.979, "size_bytes": 100.0, "latency_ms": 0.5}
    b = {"accuracy": 0.97, "size_bytes": 200.0, "latency_ms": 0.6}  # dominated by a
    c = {"accuracy": 0.95, "size_bytes": 50.0, "latency_ms": 0.9}
    assert pareto_front([base, a, b, c]) == [base, a, c]
    cfg = AutoConfig(max_accuracy_drop=0.5)
    assert feasible(a, base, cfg) and not feasible(b, base, cfg)
    assert not feasible(a, base, AutoConfig(max_accuracy_drop=0.5, max_size_kb=0.05))
    assert score(a, base) < score(b, base) < 0  # a is smaller and faster than b


@pytest.fixture(scope="module")
def advised(tmp_path_factory, trained_lenet5, digits_task):
    out = tmp_path_factory.mktemp("auto")
    return out, advise(trained_lenet5, digits_task, AutoConfig(max_accuracy_drop=100, **TINY), out)


def test_advisor_recommends_and_builds_a_recipe(advised, digits_task):
    out, result = advised
    rec = result["sections"]["recommendation"]
    assert rec["reasons"] and any("sparsity" in r for r in rec["reasons"])
    recipe = load_recipe(out / "recipe.yaml")  # the recommendation is a runnable recipe
    assert [s.technique for s in recipe.stages] == [s["technique"] for s in result["recipe"]["stages"]]
    pareto = result["sections"]["pareto front (validation split)"]
    assert len(pareto["trials"]) >= 1 and pareto["front"]
    # students: every candidate is at most half the MACs, lower input resolutions included, one kept
    screened = result["sections"]["student screening (validation split)"]["students"]
    base_macs = pareto["baseline"]["metrics"]["macs"]
    assert screened and all(0 < r["macs"] <= 0.5 * base_macs for r in screened)
    assert any("@pool" in r["student"] for r in screened) and sum(r["kept"] for r in screened) == 1
    for r in screened:  # each student trained both ways, the better one kept
        assert r["accuracy"] == max(r["kd_accuracy"], r["labels_accuracy"])
        assert r["student"].endswith("@labels") == (r["labels_accuracy"] > r["kd_accuracy"])
    assert any("candidate students" in r for r in rec["reasons"])
    sens = result["sections"]["per-layer sensitivity"]["analysis"]
    assert set(sens) == {"sparsity", "rank", "bits", "bits_per_tensor"}
    assert set(sens["bits"]["curves"]) == {"features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6  # stage plots, 2 Pareto plots, 3 heatmaps
    assert json.loads((out / "result.json").read_text())["sections"]["recommendation"]["params"] == rec["params"]


def test_advisor_infeasible_budget_is_a_typed_error(tmp_path, trained_lenet5, digits_task):
    cfg = AutoConfig(max_accuracy_drop=0.5, max_size_kb=0.01, **{**TINY, "trials": 1})
    with pytest.raises(InfeasibleError, match="no recipe met the constraints.*max size 0.01 KiB.*report.html"):
        advise(trained_lenet5, digits_task, cfg, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())  # what was measured is still reported
    assert result["sections"]["pareto front (validation split)"]["trials"]
    assert result["sections"]["advisor"]["recommendation"] is None and (tmp_path / "report.html").is_file()
    assert not (tmp_path / "recipe.yaml").exists()


def test_report_renders_in_headless_chromium(advised, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, _ = advised
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    console_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert console_errors == []
    from PIL import Image

    with Image.open(shot) as img:  # a rendered page, not a blank one
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or [1] * 1000) > 50


def test_student_keys_round_trip_into_distill_stages():
    from slimkit.pipeline.advisor import build_stages, describe, parse_student, student_key

    key = student_key("lenet300_100", 0.5, 2, labels=True)
    assert parse_student(key) == ("lenet300_100", 0.5, 2, True)
    assert parse_student(student_key("lenet5", 0.25)) == ("lenet5", 0.25, 1, False)
    params = {"student": key, "prune_structured": "none", "format": "quantize:int8"}
    distill_stage, quant_stage = build_stages(params, AutoConfig())
    cfg = distill_stage.technique_config()
    assert cfg.alpha == 0.0 and cfg.student_kwargs == {"input_pool": 2} and cfg.augment == "shift"
    assert build_stages({**params, "student": student_key("lenet5", 0.5)}, AutoConfig())[0].technique_config().alpha == 0.9
    assert describe(params).startswith("train lenet300_100 at width 0.5 on 2x2-averaged input on the labels, then int8")


def test_advisor_times_every_trial_side_by_side_and_its_prose_matches_the_table(advised):
    from slimkit.evaluate.latency import describe_speedup, speedup

    out, result = advised
    pareto = result["sections"]["pareto front (validation split)"]
    base, points = pareto["baseline"], pareto["trials"]
    for p in [base] + points:  # one interleaved comparison of the original and every trial
        assert p["timing"]["side_by_side"] == len(points) + 1 and p["latency_ms"] == p["timing"]["median_ms"]
        assert len(p["timing"]["round_medians_ms"]) == p["timing"]["rounds"] >= 3
    assert all("vs_baseline" in p["timing"] for p in points) and "vs_baseline" not in base["timing"]
    chosen = next(p for p in points if p["params"] == result["sections"]["recommendation"]["params"])
    reasons = result["sections"]["recommendation"]["reasons"]
    headline = next(r for r in reasons if r.startswith("Recommended"))
    assert describe_speedup(chosen["timing"]["vs_baseline"]) in headline  # the table's own figures
    int8 = [r for r in reasons if r.startswith("int8 static quantization")]
    for line in int8:  # a twin comparison: recomputed from the two rows of the same call
        p = next(q for q in points if q["params"]["format"] == "quantize:int8")
        twin = next((q for q in points if q["params"] == {**p["params"], "format": "fp32"}), base)
        assert describe_speedup(speedup(twin["timing"], p["timing"]), "fp32 on the same network") in line
    html = (out / "report.html").read_text()
    vs = chosen["timing"]["vs_baseline"]
    cell = f"{vs['speedup']:.1f}</td><td>&#9733;" if vs["reliable"] else "&asymp;1</span></td><td>&#9733;"
    assert cell in html


def test_screening_subset_and_scaled_rebuild_epochs(digits_task):
    from slimkit.pipeline.advisor import build_stages, screening_task

    screen, scale = screening_task(digits_task, AutoConfig(screen_images=500))
    n = len(digits_task.train)
    assert len(screen.train) == 500 and scale == pytest.approx(500 / n)
    assert screen.val is digits_task.val and screen.test is digits_task.test  # validation stays whole
    again, _ = screening_task(digits_task, AutoConfig(screen_images=500))
    assert again.train.indices == screen.train.indices  # a fixed subset, not a new draw per call
    same, one = screening_task(digits_task, AutoConfig(screen_images=None))
    assert same is digits_task and one == 1.0
    params = {"student": "lenet5@0.5", "prune_structured": "macs50", "format": "pack:prune80"}
    cfg = AutoConfig(student_epochs=120, recovery_epochs=10, prune_epochs=9, codebook_epochs=2, sparsities=[0.8])
    full = build_stages(params, cfg, scale=0.1)
    assert [s.config.get("epochs") for s in full[:1]] == [12]
    assert full[1].config["recovery"]["epochs"] == 1 and full[2].config["codebook_epochs"] == 1
    assert full[2].config["prune"]["recovery"]["epochs"] == 1


def test_clock_stops_when_the_rebuild_would_not_fit():
    from slimkit.pipeline.advisor import Clock

    import time

    assert Clock(None).allows("x")
    clock = Clock(100.0, start=time.perf_counter() - 40)  # 60 s left
    clock.reserve = 30.0
    assert clock.allows("a")  # 60 >= 1.5 x 30
    clock.reserve = 50.0
    assert not clock.allows("after 3 of 16 trials") and clock.stopped == "after 3 of 16 trials"
    clock.reserve = 0.0
    assert not clock.allows("b") and clock.stopped == "after 3 of 16 trials"  # once stopped, stays stopped


def test_screening_stops_at_its_share_of_the_time_budget(tmp_path, trained_lenet5, digits_task, monkeypatch):
    from slimkit.pipeline import advisor_search
    from slimkit.pipeline.advisor_space import student_candidates

    # a share so small that the second student would overrun it whatever this CPU's speed
    monkeypatch.setattr(advisor_search, "SCREEN_SHARE", 1e-9)
    cfg = AutoConfig(**{**TINY, "max_students": 3}, time_budget_s=1e6)
    clock = advisor_search.Clock(cfg.time_budget_s)
    runner = advisor_search._Runner(trained_lenet5, digits_task, cfg, tmp_path)
    kept, rows = advisor_search.screen_students(runner, {"accuracy": 1.0}, cfg, clock)
    total = len(student_candidates(trained_lenet5, digits_task))
    assert total > 1 and len(rows) == 1 and kept == [rows[0]["student"]]
    assert clock.screening.startswith(f"screened 1 of {total} students") and clock.stopped is None  # trials go on
    assert "budget" in budget_notes({"epoch_scale": 1.0, "stopped": None, "screening_stopped": clock.screening,
                                     "time_budget_s": 1e6})[0]


def test_advisor_respects_a_time_budget_on_a_subset(tmp_path, trained_lenet5, digits_task, monkeypatch):
    from slimkit.pipeline.advisor import Clock

    # The budget runs out at the fourth check whatever this CPU's speed (a real 25 s clock made the test
    # depend on the machine: a fast one ran all 12 trials inside it).
    checks: list[str] = []
    real_allows = Clock.allows
    monkeypatch.setattr(Clock, "allows", lambda self, what: checks.append(what) or real_allows(self, what))
    monkeypatch.setattr(Clock, "left", lambda self: 1e9 if len(checks) < 4 else 0.0)
    cfg = AutoConfig(max_accuracy_drop=100, **{**TINY, "trials": 12, "student_epochs": 4}, screen_images=600,
                     time_budget_s=25.0)
    result = advise(trained_lenet5, digits_task, cfg, tmp_path)
    budget = result["sections"]["advisor"]["budget"]
    assert budget["screen_images"] == 600 and budget["train_images"] == len(digits_task.train)
    assert budget["trials_run"] < 12 and budget["stopped"] == checks[3]  # stopped at the check that ran out
    reasons = result["sections"]["recommendation"]["reasons"]
    assert any("searched on 600 of the" in r for r in reasons) and any("time budget 25 s" in r for r in reasons)
    assert load_recipe(tmp_path / "recipe.yaml").stages  # rebuilt on the full data with scaled epochs


def test_finalists_are_rebuilt_on_all_training_images(tmp_path, trained_lenet5, digits_task):
    cfg = AutoConfig(max_accuracy_drop=100, **{**TINY, "trials": 4, "student_epochs": 5, "finalists": 2},
                     screen_images=600)
    result = advise(trained_lenet5, digits_task, cfg, tmp_path)
    trials = result["sections"]["pareto front (validation split)"]["trials"]
    base = result["sections"]["pareto front (validation split)"]["baseline"]
    finalists = [p for p in trials if p.get("finalist")]
    assert 1 <= len(finalists) <= 2
    for p in finalists:  # smaller on the subset's figures (the latencies were timed again since), budgets scaled
        assert p["subset"]["size_bytes"] < base["size_bytes"]
        distill = [st for st in p["stages"] if st["technique"] == "distill"]
        if distill:
            assert distill[0]["config"]["epochs"] == max(1, round(5 * 600 / len(digits_task.train)))
    budget = result["sections"]["advisor"]["budget"]
    assert [f["trial"] for f in budget["finalists"]] == [p["trial"] for p in finalists]
    assert any("finalists rebuilt on all" in r for r in result["sections"]["recommendation"]["reasons"])


def test_cli_time_budget_parsing_and_errors(tmp_path, capsys):
    from slimkit.cli.main import main
    from slimkit.pipeline.cli import parse_duration

    assert (parse_duration("600"), parse_duration("10m"), parse_duration("1.5h"), parse_duration("90s")) == \
        (600.0, 600.0, 5400.0, 90.0)
    for bad, message in (("abc", "use seconds"), ("-5m", "must be positive"), ("0", "must be positive")):
        assert main(["auto", "zoo:lenet5", "--time-budget", bad, "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err

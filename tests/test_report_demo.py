import json

from slimkit.pipeline.demo import run_demo
from slimkit.report import new_result, stage_entry, write_html, write_json


def test_report_json_and_html(tmp_path):
    result = new_result({"name": "m"}, {"name": "d"})
    result["stages"] = [
        stage_entry("baseline", metrics={"accuracy": 0.97, "size_bytes": 240_000, "params": 10, "nonzero_params": 10,
                                         "latency": [{"runtime": "onnxruntime-cpu", "batch_size": 64, "median_ms": 1.0}]}),
        stage_entry("int8", metrics={"accuracy": 0.965, "size_bytes": 70_000,
                                     "latency": [{"runtime": "onnxruntime-cpu", "batch_size": 64, "median_ms": 0.5}]},
                    simulated=True, notes=["<script>alert(1)</script>"]),
        stage_entry("broken", error="boom"),
    ]
    result["sections"]["constraints"] = [{"name": "size (KiB)", "value": 68.36, "limit": 50, "ok": False}]
    write_json(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == "slimkit-result/1"
    html = write_html(result, tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # accuracy-vs-size and accuracy-vs-latency
    assert "3.4" in html  # 240000 / 70000 times smaller
    assert "-0.50" in html and "failed: boom" in html and "simulated" in html
    assert "<script>" not in html  # notes are escaped; the report is self-contained, no scripts
    assert "<td>size (KiB)</td><td>68.36</td><td>50</td><td><b>NO</b></td>" in html  # a table, not a JSON dump


def test_demo_writes_report_and_json(tmp_path):
    from slimkit.pipeline.advisor import AutoConfig

    tiny = AutoConfig(max_accuracy_drop=100, trials=2, student_epochs=1, max_students=1, structured_targets=[0.5],
                      sparsities=[0.8], prune_epochs=1, recovery_epochs=1, codebook_epochs=0, latency_batch_size=8)
    result = run_demo(tmp_path, epochs=2, only=[], advisor_config=tiny)
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["stages"][0]["name"] == "baseline"
    assert data["stages"][0]["metrics"]["size_bytes"] == (tmp_path / "artifacts" / "baseline.safetensors").stat().st_size
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert result["stages"][0]["metrics"]["accuracy"] > 0.5
    advisor = data["sections"]["advisor"]  # the advisor ran on the trained baseline and is linked
    assert advisor["reasons"] and (tmp_path / "auto" / "report.html").is_file()
    assert (tmp_path / "auto" / "recipe.yaml").is_file() and "auto/report.html" in (tmp_path / "report.html").read_text()


def test_report_shows_latency_spread_and_flags_noisy_timing():
    from slimkit.report import new_result, stage_entry
    from slimkit.report.html import render_html

    def result(p90, load):
        r = new_result({"name": "m"}, {"name": "d"})
        r["environment"].update(load_average_1m=load, cpu_count=2)
        lat = [{"runtime": "onnxruntime-cpu", "batch_size": 1, "median_ms": 1.0, "p10_ms": 0.9, "p90_ms": p90}]
        r["stages"].append(stage_entry("baseline", metrics={"accuracy": 0.9, "size_bytes": 10, "latency": lat}))
        return render_html(r)

    quiet = result(1.1, 0.1)
    assert "0.900&ndash;1.100" in quiet and "<td class=noisy" not in quiet and "Noisy timing" not in quiet
    spread = result(3.0, 0.1)
    assert "<td class=noisy" in spread and "1 of 1 latency measurements spread more than 1.5x" in spread
    assert "load average was 1.9 on 2 cores" in result(1.1, 1.9)


def test_stages_are_retimed_side_by_side_with_the_baseline(tmp_path, trained_lenet5, digits_task):
    import torch.nn as nn

    from slimkit.evaluate import evaluate
    from slimkit.pipeline.stage import Timed, time_side_by_side
    from slimkit.report import stage_entry
    from slimkit.report.html import render_html

    small = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    (tmp_path / "f").write_bytes(b"x")  # sizes do not matter here
    entries, subjects = [], []
    for name, m in (("baseline", trained_lenet5), ("small", small), ("failed", None)):
        metrics = evaluate(m, digits_task, runtimes=("torch", "ort"), batch_sizes=(1,), latency_runs=3,
                           artifact=tmp_path / "f").to_dict() \
            if m is not None else {}
        entries.append(stage_entry(name, metrics=metrics))
        subjects.append(Timed(m) if m is not None else None)
    time_side_by_side(entries, subjects, digits_task, rounds=4)
    for row in entries[0]["metrics"]["latency"] + entries[1]["metrics"]["latency"]:
        assert row["side_by_side"] == 2 and row["rounds"] == 4 and len(row["round_medians_ms"]) == 4
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert all("vs_baseline" not in r for r in entries[0]["metrics"]["latency"])
    vs = [r["vs_baseline"] for r in entries[1]["metrics"]["latency"]]
    assert len(vs) == 2 and all(v["low"] <= v["speedup"] <= v["high"] for v in vs)
    r = new_result({"name": "m"}, {"name": "d"})
    r["stages"] = entries
    assert "vs baseline" in render_html(r)

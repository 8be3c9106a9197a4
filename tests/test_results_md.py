"""benchmarks/RESULTS.md is generated from the benchmark JSONs and says what they say."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("results_md", ROOT / "benchmarks" / "results_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_page_is_generated_from_the_current_jsons():
    gen = _generator()
    assert gen.main(["--check"]) == 0, "benchmarks/RESULTS.md is stale: run benchmarks/results_md.py"
    page = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for section, file, *_ in gen.CURRENT:
        data = json.loads((ROOT / "benchmarks" / "results" / file).read_text())
        assert f"### {file}" in page
        for c in data.get("checks") or []:  # every check, with its verdict, is on the page
            verdict = "pass" if c["ok"] else "**FAIL**"
            assert f"| {verdict} |" in page and gen._cell(c["target"]) in page


def test_results_page_check_fails_when_a_json_changes(tmp_path, monkeypatch):
    gen = _generator()
    results = tmp_path / "results"
    results.mkdir()
    for _, file, *_ in gen.CURRENT:
        (results / file).write_bytes((ROOT / "benchmarks" / "results" / file).read_bytes())
    monkeypatch.setattr(gen, "RESULTS", results)
    monkeypatch.setattr(gen, "PAGE", tmp_path / "RESULTS.md")
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    name = gen.CURRENT[0][1]
    data = json.loads((results / name).read_text())
    data["checks"][0]["ok"] = not data["checks"][0]["ok"]
    (results / name).write_text(json.dumps(data))
    assert gen.main(["--check"]) == 1

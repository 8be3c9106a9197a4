"""Never slower than float by default: the speed check keeps float the cheapest layers where int8 loses.
Timings are replaced by a fake in the mechanism tests (tests assert behaviour, not this machine's speed)."""
import pytest
import torch

import slimkit as sk
from slimkit.quantize import QuantConfig, speed
from slimkit.quantize.apply import is_quantized
from slimkit.quantize.graph import weight_layers


def _fake(slower_until: int | None, calls: list):
    """measure() stand-in: int8 slower until at least `slower_until` layers are float (None: always slower)."""
    def measure(float_model, quantized, example, batch_sizes, threads):
        kept = 5 - len(weight_layers(quantized))
        calls.append(kept)
        slower = slower_until is None or kept < slower_until
        r = 0.5 if slower else 1.5
        return {bs: {"speedup": r, "low": r, "high": r, "reliable": True, "float_ms": 1.0, "int8_ms": 1 / r}
                for bs in batch_sizes}
    return measure


def test_int8_that_is_faster_is_kept(trained_lenet5, digits_task, monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "measure", _fake(0, calls))
    q = sk.quantize(trained_lenet5, QuantConfig(calibration_samples=64), task=digits_task)
    assert calls == [0] and len(weight_layers(q)) == 5
    assert any(n.startswith("speed check (ONNX Runtime, 1 thread(s)): batch 1: int8") for n in q.slimkit_notes)


def test_the_cheapest_layers_are_kept_float_until_int8_is_not_slower(trained_lenet5, digits_task, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(speed, "measure", _fake(2, calls))
    q = sk.quantize(trained_lenet5, QuantConfig(calibration_samples=64), task=digits_task)
    assert calls == [0, 1, 2]  # 1 layer float, then 2
    full = sk.quantize(trained_lenet5, QuantConfig(calibration_samples=64, speed_check=False), task=digits_task)
    layers = weight_layers(full)
    macs = speed.layer_macs(full, layers, digits_task.example_input(1))
    assert len(macs) == 5 and all(v > 0 for v in macs.values())
    cheapest = sorted(layers, key=macs.get)[:2]
    assert set(layers) - set(weight_layers(q)) == set(cheapest)
    note = next(n for n in q.slimkit_notes if n.startswith("kept float:"))
    assert all(name in note for name in cheapest)
    x = digits_task.example_input(16)
    with torch.no_grad():
        assert torch.allclose(sk.load(sk.save(q, tmp_path / "q.safetensors"))(x), q(x), atol=1e-5)
    assert sk.core.state.last_stage(q, "quantize")["structure"]["speed"]["steps"][-1]["kept_float"] == cheapest


def test_a_model_int8_cannot_speed_up_stays_float(trained_lenet5, digits_task, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(speed, "measure", _fake(None, calls))
    q = sk.quantize(trained_lenet5, QuantConfig(calibration_samples=64), task=digits_task)
    assert calls == [0, 1, 2, 4] and not is_quantized(q)
    assert "kept float: every layer" in q.slimkit_notes[0]
    x = digits_task.example_input(16)
    with torch.no_grad():
        assert torch.equal(q(x), trained_lenet5(x))
        loaded = sk.load(sk.save(q, tmp_path / "q.safetensors"))
        assert torch.equal(loaded(x), q(x)) and loaded.slimkit_notes == q.slimkit_notes
    onnx = sk.export(q, tmp_path / "q.onnx", example_input=digits_task.example_input(1))
    assert onnx.is_file()


def test_speed_check_off_and_weight_only_measure_nothing(trained_lenet5, digits_task, monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "measure", _fake(None, calls))
    sk.quantize(trained_lenet5, QuantConfig(calibration_samples=64, speed_check=False), task=digits_task)
    sk.quantize(trained_lenet5, QuantConfig(activations="none"))
    assert calls == []


def test_the_real_check_measures_both_files_at_each_batch_size(trained_lenet5, digits_task):
    """Unpatched: whatever this machine's speeds, the record holds interleaved medians for each batch size."""
    q = sk.quantize(trained_lenet5, QuantConfig(calibration_samples=64, speed_batch_sizes=[1, 8]), task=digits_task)
    record = sk.core.state.last_stage(q, "quantize")["structure"]["speed"]
    first = record["steps"][0]["batches"]
    assert set(first) == {"1", "8"}
    assert all(b["float_ms"] > 0 and b["int8_ms"] > 0 and b["low"] <= b["speedup"] <= b["high"] for b in first.values())
    assert any(n.startswith(("speed check", "kept float")) for n in q.slimkit_notes)


def test_compare_latency_interleaves_and_reports_spread():
    from slimkit.evaluate.latency import compare_latency, speedup

    order = []
    stats = compare_latency({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, min_runs=2,
                            round_time_s=0, warmup=0)
    assert order == ["a", "a", "b", "b"] * 3  # round by round, not one variant after the other
    assert stats["a"]["runs"] == 6 and len(stats["a"]["round_medians_ms"]) == 3
    assert stats["a"]["p10_ms"] <= stats["a"]["median_ms"] <= stats["a"]["p90_ms"]
    s = speedup({"round_medians_ms": [2.0, 2.0, 2.0]}, {"round_medians_ms": [1.0, 0.5, 4.0]})
    assert s["speedup"] == 2.0 and s["low"] == 0.5 and s["high"] == 4.0 and not s["reliable"]


def test_bad_speed_batch_sizes_are_rejected():
    with pytest.raises(sk.errors.ConfigError, match="speed_batch_sizes"):
        QuantConfig(speed_batch_sizes=[0])

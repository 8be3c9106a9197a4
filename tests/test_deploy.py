"""Deployment runtimes beside ONNX Runtime: OpenVINO IR, ExecuTorch (XNNPACK) and LiteRT files of float,
structurally compressed and slimkit-quantized tiny models; each runtime's outputs against slimkit's own
(the simulation, for int8), bytes on disk, what runs off the integer/delegated kernels, error paths.
Skipped with the reason when a runtime's package is not installed (`make venv` installs all of them)."""
import importlib.util

import numpy as np
import pytest
import torch

import slimkit as sk
from slimkit.errors import ArtifactError, ConfigError, ModelError, UnsupportedLayerError
from slimkit.export import runtimes as R
from slimkit.quantize import QuantConfig

PACKAGE = {"openvino": "openvino", "executorch": "executorch", "litert": "litert_torch", "ort": "onnxruntime"}


def needs(runtime: str):
    # find_spec, not an import: importing openvino directly would load its telemetry (slimkit blocks it first)
    if importlib.util.find_spec(PACKAGE[runtime]) is None:
        pytest.skip(f"{runtime}: package {PACKAGE[runtime]} not installed")


@pytest.fixture(scope="module")
def q_lenet(trained_lenet5, digits_task):
    return sk.quantize(trained_lenet5, QuantConfig(weights="int8", activations="uint8", calibration_samples=256,
                                                   speed_check=False), task=digits_task)


@pytest.mark.parametrize("runtime", ["openvino", "executorch", "litert"])
def test_float_export_matches_pytorch(runtime, trained_lenet5, digits_task, tmp_path):
    needs(runtime)
    path = sk.export(trained_lenet5, tmp_path / f"f{R.SUFFIX[runtime]}", example_input=digits_task.example_input(1))
    parity = R.check_parity(trained_lenet5, path, digits_task.example_input(64))
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4 * max(parity["output_std"], 1.0)


@pytest.mark.parametrize("runtime", ["openvino", "executorch", "litert"])
def test_int8_export_keeps_slimkits_numbers_on_integer_kernels(runtime, q_lenet, trained_lenet5, digits_task, tmp_path):
    needs(runtime)
    example = digits_task.example_input(1)
    path = sk.export(q_lenet, tmp_path / f"q{R.SUFFIX[runtime]}", example_input=example)
    fp32 = sk.export(trained_lenet5, tmp_path / f"f{R.SUFFIX[runtime]}", example_input=example)
    parity = R.check_parity(q_lenet, path, digits_task.example_input(64))
    # the runtime's integer kernels vs slimkit's float simulation of them: one code apart at most on a tie;
    # ExecuTorch quantizes the logits layer's input again per call (XNNPACK's dynamic kernel, docs/deployment.md)
    assert parity["top1_agreement"] == 1.0
    mean_bound = 3e-3 if runtime == "executorch" else 1e-3
    assert parity["max_abs_diff"] < 2e-2 * parity["output_std"] and parity["mean_abs_diff"] < mean_bound * parity["output_std"]
    assert R.file_bytes(path) < 0.42 * R.file_bytes(fp32)  # int8 weights stored as int8
    kernels = R.slow_path(path)
    if runtime == "executorch":
        assert kernels["backends"] == ["XnnpackBackend"] and kernels["delegate_calls"] >= 1
        assert not kernels["portable_ops"], kernels  # everything in XNNPACK, the logits layer on its dynamic kernel
    elif runtime == "litert":
        assert kernels["ops"].get("CONV_2D int8", 0) + kernels["ops"].get("DEPTHWISE_CONV_2D int8", 0) == 2
        assert kernels["ops"].get("FULLY_CONNECTED int8", 0) == 2  # the logits layer stays float (its output is)
        # ... but its weights are stored as int8 codes read through a DEQUANTIZE (beside its input's)
        assert kernels["ops"].get("DEQUANTIZE int8", 0) == 2 and R.file_bytes(path) < 0.32 * R.file_bytes(fp32)
    else:
        assert kernels["layers"].get("Convolution u8", 0) == 2 and kernels["layers"].get("FullyConnected u8", 0) >= 2


def test_int8_executorch_of_a_factorized_and_pruned_model(trained_lenet5, digits_task, tmp_path):
    needs("executorch")
    from slimkit.lowrank import LowRankConfig

    small = sk.factorize(trained_lenet5, LowRankConfig(energy=0.95), task=digits_task)
    q = sk.quantize(small, QuantConfig(weights="int8", activations="uint8", calibration_samples=128, speed_check=False),
                    task=digits_task)
    path = sk.export(q, tmp_path / "fq.pte", example_input=digits_task.example_input(1))
    parity = R.check_parity(q, path, digits_task.example_input(64))
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 2e-2 * parity["output_std"]


def test_static_programs_run_any_batch_in_chunks(trained_lenet5, digits_task, tmp_path):
    needs("executorch")
    path = sk.export(trained_lenet5, tmp_path / "b4.pte", example_input=digits_task.example_input(4))
    run = R.runner(path)
    assert run.batch == 4
    x = digits_task.example_input(10)  # 4 + 4 + 2 (padded)
    with torch.no_grad():
        assert np.allclose(run(x.numpy()), trained_lenet5(x).numpy(), atol=1e-5)


def test_evaluate_times_every_runtime_and_labels_phone_runtimes(q_lenet, digits_task):
    for rt in ("openvino", "executorch", "litert"):
        needs(rt)
    m = sk.evaluate(q_lenet, digits_task, runtimes=("ort", "openvino", "executorch", "litert"), batch_sizes=(1, 8),
                    latency_runs=3)
    rows = {(r["runtime"], r["batch_size"]): r for r in m.latency}
    assert set(rows) == {(rt, b) for rt in ("onnxruntime-cpu", "openvino-cpu", "executorch-xnnpack", "litert") for b in (1, 8)}
    assert all(r["median_ms"] > 0 and r["threads"] == 1 for r in rows.values())
    assert "not a phone latency" in rows[("executorch-xnnpack", 8)]["note"] and "note" not in rows[("openvino-cpu", 1)]


def test_layers_without_an_int8_kernel_are_refused_with_the_layer_named(trained_mlp, tmp_path):
    needs("executorch")
    task = sk.data.digits(flatten=True)
    dyn = sk.quantize(trained_mlp, QuantConfig(weights="int8", activations="uint8", mode="dynamic"))
    with pytest.raises(UnsupportedLayerError, match="dynamically quantized layer.*ONNX"):
        sk.export(dyn, tmp_path / "d.pte", example_input=task.example_input(1))
    w16 = sk.quantize(trained_mlp, QuantConfig(weights="int16", activations="int16", calibration_samples=64, speed_check=False), task=task)
    with pytest.raises(UnsupportedLayerError, match="int16"):
        sk.export(w16, tmp_path / "w16.tflite", example_input=task.example_input(1))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_files_and_arguments(trained_lenet5, tmp_path):
    needs("executorch")
    with pytest.raises(ConfigError, match="example_input"):
        sk.export(trained_lenet5, tmp_path / "m.pte")
    with pytest.raises(ConfigError, match="no runtime runs"):
        R.runner(tmp_path / "m.bin")
    with pytest.raises(ArtifactError, match="not found"):
        R.runner(tmp_path / "missing.pte")
    for suffix in (".pte", ".tflite", ".xml"):
        needs({".pte": "executorch", ".tflite": "litert", ".xml": "openvino"}[suffix])
        bad = tmp_path / f"corrupt{suffix}"
        bad.write_bytes(b"\x00garbage" * 16)
        with pytest.raises(ModelError, match=bad.name):
            R.runner(bad)


def test_report_gives_other_runtimes_their_columns_with_where_they_were_timed():
    from slimkit.pipeline.recipe import Evaluation
    from slimkit.report.html import stage_table

    assert Evaluation(runtimes=["torch", "executorch", "litert", "openvino"]).runtimes[1] == "executorch"
    with pytest.raises(Exception, match="runtimes"):
        Evaluation(runtimes=["coreml"])
    note = "phone runtime timed on this x86_64 host (avx2): not a phone latency"
    row = {"runtime": "executorch-xnnpack", "batch_size": 1, "median_ms": 0.5, "p10_ms": 0.4, "p90_ms": 0.6,
           "threads": 1, "version": "1.5.1", "note": note}
    stages = [{"name": "baseline", "metrics": {"accuracy": 0.9, "latency": [row]}},
              {"name": "int8", "metrics": {"accuracy": 0.89, "latency": [{**row, "median_ms": 0.25}]}}]
    table = stage_table(stages)
    assert "executorch-xnnpack ms b1" in table and "not a phone latency" in table
    assert "0.25" in table and "0.5" in table

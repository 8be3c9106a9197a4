import pytest
import torch

import slimkit
from slimkit import zoo
from slimkit.core.trainer import TrainConfig, accuracy, fit
from slimkit.evaluate import count_macs, count_params, evaluate, fidelity


def test_trainer_learns_and_does_not_mutate_input(digits_task):
    model = zoo.for_task("lenet300_100", digits_task)
    before = [p.clone() for p in model.parameters()]
    result = fit(model, digits_task, TrainConfig(epochs=3, lr=1e-3), progress=False)
    assert accuracy(result.model, digits_task, "val") > 0.85
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(result.history) == 3 and "val_accuracy" in result.history[0]


def test_trainer_same_seed_same_weights(digits_task):
    model = zoo.for_task("lenet5", digits_task)
    a = fit(model, digits_task, TrainConfig(epochs=1, seed=3, max_steps=10), progress=False).model
    b = fit(model, digits_task, TrainConfig(epochs=1, seed=3, max_steps=10), progress=False).model
    c = fit(model, digits_task, TrainConfig(epochs=1, seed=4, max_steps=10), progress=False).model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_early_stopping_keeps_best_epoch(digits_task):
    model = zoo.for_task("lenet300_100", digits_task)
    # a learning rate far too high makes validation accuracy fall after the first epochs
    result = fit(model, digits_task, TrainConfig(epochs=6, lr=1e-3, patience=1, schedule="constant"), progress=False)
    best = max(h["val_accuracy"] for h in result.history)
    assert accuracy(result.model, digits_task, "val") == pytest.approx(best)
    assert result.best_epoch is not None


def test_early_stopping_keeps_the_latest_of_equal_epochs_but_stops_on_a_plateau(digits_task):
    model = zoo.for_task("lenet300_100", digits_task)
    # a learning rate too small to change any prediction: every epoch ties the first
    result = fit(model, digits_task, TrainConfig(epochs=8, lr=1e-12, patience=2, schedule="constant"), progress=False)
    accs = [h["val_accuracy"] for h in result.history]
    assert len(set(accs)) == 1
    assert len(accs) == 3  # ties do not reset the patience: stopped after two epochs without improvement
    assert result.best_epoch == 3  # and the latest of the equal epochs is the one kept


def test_hooks_and_custom_loss(digits_task):
    steps, epochs = [], []
    calls = {"n": 0}

    def loss(model, x, y):
        calls["n"] += 1
        return torch.nn.functional.cross_entropy(model(x), y)

    fit(zoo.for_task("lenet300_100", digits_task), digits_task, TrainConfig(epochs=2, max_steps=5), loss=loss,
        on_step=lambda m, s: steps.append(s), on_epoch=lambda m, e: epochs.append(e), progress=False)
    assert steps == [1, 2, 3, 4, 5] and calls["n"] == 5 and epochs == [0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_runs_on_cuda(digits_task):
    model = zoo.for_task("lenet5", digits_task)
    seen = []
    result = fit(model, digits_task, TrainConfig(epochs=1, max_steps=20, device="cuda"),
                 on_step=lambda m, s: seen.append(next(m.parameters()).device.type), progress=False)
    assert set(seen) == {"cuda"}
    assert next(result.model.parameters()).device.type == "cpu"  # returned where it came from
    assert accuracy(result.model, digits_task, "val") > 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_is_deterministic_and_restores_the_settings(digits_task):
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    model = zoo.for_task("mobilenetv2_small", digits_task)  # depthwise convs, adaptive pooling
    runs = [fit(model, digits_task, TrainConfig(epochs=1, max_steps=15, seed=5, device="cuda"), progress=False).model
            for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))
    assert (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before


def test_lenet5_params_and_macs_match_hand_count():
    model = zoo.lenet5()
    # conv1 6*28*28*25 + conv2 16*10*10*150 + fc 400*120 + 120*84 + 84*10
    assert count_macs(model, torch.randn(1, 1, 28, 28)) == 117_600 + 240_000 + 48_000 + 10_080 + 840
    assert count_params(model)["params"] == 61_706


def test_nonzero_params_counts_zeros():
    model = zoo.lenet300_100()
    with torch.no_grad():
        model[1].weight[:100].zero_()
    counts = count_params(model)
    assert counts["params"] - counts["nonzero_params"] == 100 * 784


def test_fidelity_of_identical_and_different_outputs():
    a = torch.randn(50, 10)
    same = fidelity(a, a)
    assert same["top1_agreement"] == 1.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    other = fidelity(torch.randn(50, 10), a)
    assert other["top1_agreement"] < 0.5 and other["kl_mean"] > 0.1
    emb = fidelity(a, a * 2, kind="embedding")
    assert emb["cosine_min"] == pytest.approx(1.0)


def test_evaluate_reports_everything(trained_lenet5, digits_task, tmp_path):
    m = evaluate(trained_lenet5, digits_task, reference=trained_lenet5, runtimes=("torch", "ort"), batch_sizes=(1, 8),
                 latency_runs=5)
    assert m.accuracy > 0.9 and m.top5 >= m.accuracy
    assert m.fidelity["top1_agreement"] == 1.0
    assert m.params == 61_706 and m.macs == 416_520
    # size is the bytes of a really written safetensors file: fp32 weights plus a small header
    assert 61_706 * 4 < m.size_bytes < 61_706 * 4 + 8_000
    runtimes = {(r["runtime"], r["batch_size"]) for r in m.latency}
    assert runtimes == {("torch-eager", 1), ("torch-eager", 8), ("onnxruntime-cpu", 1), ("onnxruntime-cpu", 8)}
    assert all(r["threads"] == 1 and r["median_ms"] > 0 for r in m.latency)
    assert "accuracy" in str(m)


def test_onnx_export_parity(trained_lenet5, digits_task, tmp_path):
    from slimkit.export import check_onnx_parity

    path = slimkit.export(trained_lenet5, tmp_path / "m.onnx", example_input=digits_task.example_input(1))
    parity = check_onnx_parity(trained_lenet5, path, digits_task.example_input(16))  # dynamic batch
    assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0


def test_export_unknown_format(trained_lenet5, tmp_path):
    from slimkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown format '.mlmodel'; known: .*\.pte.*\.tflite.*\.xml"):
        slimkit.export(trained_lenet5, tmp_path / "m.mlmodel")


def test_torch_latency_channels_last_runs_a_nhwc_copy(trained_lenet5, digits_task):
    from slimkit.evaluate import torch_latency

    x = digits_task.example_input(4)
    r = torch_latency(trained_lenet5, x, runs=3, warmup=1, channels_last=True)
    assert r["memory_format"] == "channels_last" and r["median_ms"] > 0 and r["batch_size"] == 4
    # the caller's model and input keep their layout
    assert trained_lenet5.features[0].weight.is_contiguous() and x.is_contiguous()
    assert torch_latency(trained_lenet5, x, runs=3, warmup=1)["memory_format"] == "contiguous"

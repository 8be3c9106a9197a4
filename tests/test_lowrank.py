"""Low-rank factorization: exactness at full rank, rank selection, skips and errors, save/load, CLI."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.errors import ConfigError, SelectorError, UnsupportedLayerError
from slimkit.lowrank import LowRankConfig, factorization_report, factorize
from slimkit.lowrank.decompose import spectra
from slimkit.lowrank.modules import ChannelSVDConv, LowRankLinear, SpatialSVDConv, Tucker2Conv
from slimkit.lowrank.rank import energy_rank, kept_energy, vbmf_rank


def tiny_cnn():
    torch.manual_seed(0)
    return sk.zoo.vgg_small(input_size=8, width=0.25).eval()  # channels 8/16/32


def conv_layer(**kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(6, 10, **kw), nn.ReLU()).eval()


@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
def test_full_rank_conv_factorization_is_exact(method):
    model = tiny_cnn()
    x = torch.randn(4, 1, 8, 8)
    small = factorize(model, LowRankConfig(energy=1.0, conv_method=method, only_if_smaller=False)).eval()
    layers = factorization_report(small)["layers"]
    assert len(layers) == 7  # 6 convs + the classifier
    expected = {"channel": ChannelSVDConv, "spatial": SpatialSVDConv, "tucker2": Tucker2Conv}[method]
    assert isinstance(small.features[3], expected)
    assert isinstance(small.classifier[1], LowRankLinear)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1)),
                                dict(kernel_size=3, padding=2, dilation=2, bias=False)])
@pytest.mark.parametrize("method", ["channel", "spatial", "tucker2"])
def test_full_rank_keeps_stride_padding_dilation(method, kw):
    model = conv_layer(**kw)
    x = torch.randn(2, 6, 11, 13)
    small = factorize(model, LowRankConfig(energy=1.0, conv_method=method, only_if_smaller=False)).eval()
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-4)


def test_full_rank_linear_svd_is_exact(trained_mlp, digits_task):
    x = digits_task.example_input(8)
    small = factorize(trained_mlp, LowRankConfig(energy=1.0, only_if_smaller=False))
    assert [v["rank"] for v in factorization_report(small)["layers"].values()] == [300, 100, 10]
    torch.testing.assert_close(small(x), trained_mlp(x), atol=1e-4, rtol=1e-4)


def test_energy_rank_keeps_the_stated_fraction(trained_mlp):
    for energy in (0.5, 0.9, 0.99):
        small = factorize(trained_mlp, LowRankConfig(energy=energy, only_if_smaller=False))
        for name, info in factorization_report(small)["layers"].items():
            s = spectra("svd", trained_mlp.get_submodule(name))[0]
            assert info["energy_kept"] >= energy - 1e-9
            assert info["rank"] == 1 or kept_energy(s, info["rank"] - 1) < energy  # smallest such rank
            assert small.get_submodule(name).first.out_features == info["rank"]


def test_energy_rank_function():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
    assert energy_rank(s, 1.0) == 3


def test_ratio_rank_respects_parameter_budget(trained_mlp):
    small = factorize(trained_mlp, LowRankConfig(rank_selection="ratio", param_ratio=0.25))
    layers = factorization_report(small)["layers"]
    assert layers, "the 784x300 layer must be factorized"
    for info in layers.values():
        assert info["params_after"] <= 0.25 * info["params_before"]
    assert sk.evaluate.count_params(small)["params"] < 0.5 * sk.evaluate.count_params(trained_mlp)["params"]


def test_vbmf_recovers_the_rank_of_noisy_low_rank_matrix():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 80))
    noisy = signal + 0.1 * rng.normal(size=signal.shape)
    assert vbmf_rank(noisy) == 5
    assert vbmf_rank(noisy.T) == 5


def test_vbmf_selection_runs_on_trained_model(trained_lenet5):
    small = factorize(trained_lenet5, LowRankConfig(rank_selection="vbmf"))
    layers = factorization_report(small)["layers"]
    assert layers and all(1 <= (min(v["rank"]) if isinstance(v["rank"], list) else v["rank"]) for v in layers.values())


def test_layers_that_would_grow_are_skipped_with_reason(trained_lenet5):
    small = factorize(trained_lenet5, LowRankConfig(energy=0.99))
    skipped = factorization_report(small)["skipped"]
    # conv1 (1 -> 6 channels, 5x5) cannot get cheaper
    assert "features.0" in skipped and "would not be smaller" in skipped["features.0"]
    assert isinstance(small.features[0], nn.Conv2d)
    assert any("skipped features.0" in n for n in small.slimkit_notes)


def test_input_model_is_not_mutated(trained_mlp):
    before = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    factorize(trained_mlp, LowRankConfig(energy=0.9))
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten, nn.Sequential)) for m in trained_mlp.modules())
    for k, v in trained_mlp.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("method", ["channel", "tucker2", "spatial"])
def test_save_load_roundtrip(tmp_path, method):
    model = tiny_cnn()
    small = factorize(model, LowRankConfig(rank_selection="ratio", param_ratio=0.5, conv_method=method)).eval()
    path = sk.save(small, tmp_path / "small.safetensors")
    loaded = sk.load(path)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), small(x))
    assert type(loaded.features[3]) is type(small.features[3])
    assert sk.evaluate.count_params(loaded) == sk.evaluate.count_params(small)


@pytest.mark.parametrize("bad", [dict(energy=0.0), dict(energy=1.5), dict(energy=-0.1), dict(rank=0),
                                 dict(ranks={"fc": 0}), dict(ranks={"fc": [1, 2, 3]}), dict(param_ratio=0),
                                 dict(rank_selection="fixed"), dict(conv_method="cp"), dict(unknown_key=1)])
def test_bad_config_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        LowRankConfig(**bad)


def test_rank_above_layer_maximum(trained_mlp):
    # named layer: a typed error naming it
    with pytest.raises(ConfigError, match="'5'.*outside 1..10"):
        factorize(trained_mlp, LowRankConfig(ranks={"5": 11}))
    # global rank: layers where it does not fit are skipped with the reason
    small = factorize(trained_mlp, LowRankConfig(rank_selection="fixed", rank=50))
    report = factorization_report(small)
    assert "outside 1..10" in report["skipped"]["5"]
    assert report["layers"]["1"]["rank"] == 50


def test_ranks_must_name_selected_layers(trained_mlp):
    with pytest.raises(SelectorError, match="nope"):
        factorize(trained_mlp, LowRankConfig(ranks={"nope": 3}))


def test_grouped_conv_skipped_or_error_when_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 16, 3)).eval()
    small = factorize(model, LowRankConfig(energy=0.5))
    assert "grouped" in factorization_report(small)["skipped"]["0"]
    with pytest.raises(UnsupportedLayerError, match="'0'"):
        factorize(model, LowRankConfig(energy=0.5, selector={"include": ["0"]}))


def test_sensitivity_needs_task_and_keeps_accuracy(trained_mlp, digits_task):
    with pytest.raises(ConfigError, match="task"):
        factorize(trained_mlp, LowRankConfig(rank_selection="sensitivity"))
    from slimkit.core.trainer import accuracy

    small = factorize(trained_mlp, LowRankConfig(rank_selection="sensitivity", max_accuracy_drop=0.01), task=digits_task)
    assert factorization_report(small)["layers"]
    # per-layer budgets add up; three layers at <= 1 point each
    assert accuracy(small, digits_task, "val") >= accuracy(trained_mlp, digits_task, "val") - 0.03


def test_response_basis_keeps_stated_variance_and_the_mean(trained_mlp, digits_task):
    from slimkit.lowrank.decompose import factorize_layer, input_moments, response_basis

    layer = trained_mlp[1]
    stats = input_moments(trained_mlp, {"1": layer}, digits_task.calibration_batches())["1"]
    response = response_basis("svd", layer, stats)
    inputs = torch.cat(list(digits_task.calibration_batches())).flatten(1)
    with torch.no_grad():
        y = layer(inputs)
        torch.testing.assert_close(factorize_layer("svd", layer, 300, response)(inputs), y, atol=1e-4, rtol=1e-4)
        rank = energy_rank(response[0], 0.99)
        y_small = factorize_layer("svd", layer, rank, response)(inputs)
    torch.testing.assert_close(y_small.mean(0), y.mean(0), atol=1e-4, rtol=1e-4)
    kept = ((y_small - y_small.mean(0)) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert 0.99 - 1e-4 <= kept <= 1 + 1e-4
    assert rank < 50  # digits responses live in a low-dimensional subspace


def test_data_aware_factorize(trained_mlp, digits_task):
    x = digits_task.example_input(16)
    full = factorize(trained_mlp, LowRankConfig(energy=1.0, data_aware=True, only_if_smaller=False, calibration_samples=128),
                    task=digits_task)
    ref = trained_mlp(x)
    # full rank: exact up to the least-squares refit's small ridge term
    assert (full(x) - ref).abs().max() < 1e-2 * ref.abs().max()
    small = factorize(trained_mlp, LowRankConfig(energy=0.99, data_aware=True, calibration_samples=128), task=digits_task)
    layer = factorization_report(small)["layers"]["1"]
    assert layer["basis"] == "responses" and layer["energy_kept"] >= 0.99
    with pytest.raises(ConfigError, match="task"):
        factorize(trained_mlp, LowRankConfig(data_aware=True))


def test_data_aware_refit_reduces_conv_error_and_reloads(trained_lenet5, digits_task, tmp_path):
    x = digits_task.example_input(64)
    cfg = dict(conv_method="tucker2", rank_selection="ratio", param_ratio=0.3, calibration_samples=128)
    with torch.no_grad():
        ref = trained_lenet5(x)
        plain = factorize(trained_lenet5, LowRankConfig(**cfg))
        aware = factorize(trained_lenet5, LowRankConfig(data_aware=True, **cfg), task=digits_task)
        assert ((aware(x) - ref) ** 2).mean() < ((plain(x) - ref) ** 2).mean()
    info = factorization_report(aware)["layers"]["features.3"]
    assert info["bias"] is True and 0 <= info["refit_relative_error"] < 1
    loaded = sk.load(sk.save(aware, tmp_path / "aware.safetensors"))
    torch.testing.assert_close(loaded(x), aware(x))


def test_recovery_by_finetuning_keeps_accuracy(trained_mlp, digits_task):
    from slimkit.core.trainer import accuracy

    small = factorize(trained_mlp, LowRankConfig(energy=0.99, data_aware=True, recovery={"method": "finetune", "epochs": 1}),
                      task=digits_task)
    assert sk.evaluate.count_params(small)["params"] < sk.evaluate.count_params(trained_mlp)["params"] / 2
    assert accuracy(small, digits_task, "test") >= accuracy(trained_mlp, digits_task, "test") - 0.03


def test_cli_factorize(tmp_path, trained_mlp):
    from slimkit.cli.main import main

    src = sk.save(trained_mlp, tmp_path / "mlp.safetensors")
    out = tmp_path / "small.safetensors"
    assert main(["factorize", str(src), "--energy", "0.9", "--out", str(out)]) == 0
    loaded = sk.load(out)
    assert isinstance(loaded[1], LowRankLinear)
    assert main(["factorize", str(src), "--energy", "1.5", "--out", str(out)]) == 2
    assert main(["factorize", str(src), "--rank", "0", "--out", str(out)]) == 2
    assert main(["factorize", str(src), "--include", "missing", "--out", str(out)]) == 2


def test_registered_with_demo_config(trained_lenet5, digits_task):
    from slimkit.core import registry

    tech = registry.get("factorize")
    assert tech.restore is not None
    assert isinstance(tech.demo(trained_lenet5, digits_task), LowRankConfig)


def test_factorize_recovery_patience(trained_mlp, digits_task):
    small = factorize(trained_mlp, LowRankConfig(energy=0.9, recovery={"method": "finetune", "epochs": 4,
                                                                       "lr": 1e-12, "patience": 1}), task=digits_task)
    assert small.slimkit_recovery["ran"] == 2
    assert any("factorize recovery (finetune) stopped after 2 of 4 epochs" in n for n in small.slimkit_notes)

"""Depthwise-separable / inverted-residual conversion: exact SVD init, least squares, skips, save/load, CLI."""
import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.arch import SeparableConfig, conversion_report, separable
from slimkit.arch.apply import svd_init
from slimkit.arch.modules import DepthwiseSeparableConv, InvertedResidualConv
from slimkit.errors import ConfigError, UnsupportedLayerError


def test_full_multiplier_separable_block_is_exact():
    # with k*k components per input channel the per-channel SVD is exact
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 12, 3, stride=2, padding=1, dilation=1)
    block = svd_init(conv, DepthwiseSeparableConv.like(conv, 9))
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(block(x), conv(x), atol=1e-5, rtol=1e-4)


def test_inverted_residual_init_passes_signed_values_through_relu6():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 12, 3, padding=1)  # 4 -> 12: no residual
    conv.weight.data.mul_(0.5)
    block = svd_init(conv, InvertedResidualConv.like(conv, 18))  # 9 components x (+, -)
    assert not block.use_residual
    x = torch.rand(2, 4, 7, 7)  # inputs in [0, 6] and small outputs: ReLU6 pairs are exact
    torch.testing.assert_close(block(x), conv(x), atol=1e-5, rtol=1e-4)


def test_least_squares_init_beats_data_free_init(trained_lenet5, digits_task):
    x = digits_task.example_input(64)
    with torch.no_grad():
        ref = trained_lenet5(x)
        errors = {}
        for init in ("svd", "least_squares"):
            model = separable(trained_lenet5, SeparableConfig(init=init, recovery="none"), task=digits_task)
            errors[init] = ((model(x) - ref) ** 2).mean().item()
    assert errors["least_squares"] < 0.5 * errors["svd"]
    info = conversion_report(model)["layers"]["features.3"]
    assert 0 <= info["relative_error"] < 1
    assert info["params_after"] < info["params_before"]


def test_conversion_with_recovery_keeps_accuracy(trained_lenet5, digits_task):
    from slimkit.core.trainer import accuracy

    model = separable(trained_lenet5, SeparableConfig(recovery={"epochs": 1}, calibration_samples=128),
                      task=digits_task)
    assert isinstance(model.features[3], DepthwiseSeparableConv)
    skipped = conversion_report(model)["skipped"]
    assert "min_in_channels" in skipped["features.0"]  # the 1-channel image convolution stays
    assert isinstance(model.features[0], nn.Conv2d)
    assert accuracy(model, digits_task, "test") >= accuracy(trained_lenet5, digits_task, "test") - 0.05
    # the input model is untouched
    assert isinstance(trained_lenet5.features[3], nn.Conv2d)


@pytest.mark.parametrize("block", ["separable", "inverted_residual"])
def test_save_load_roundtrip(tmp_path, block):
    torch.manual_seed(0)
    model = sk.zoo.vgg_small(input_size=8, width=0.25).eval()
    converted = separable(model, SeparableConfig(block=block, init="svd", recovery="none")).eval()
    assert len(conversion_report(converted)["layers"]) == 5  # all but the image convolution
    loaded = sk.load(sk.save(converted, tmp_path / "m.safetensors"))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), converted(x))
    assert type(loaded.features[3]) is type(converted.features[3])


def test_residual_used_only_when_shapes_match():
    same = InvertedResidualConv.like(nn.Conv2d(8, 8, 3, padding=1))
    strided = InvertedResidualConv.like(nn.Conv2d(8, 8, 3, stride=2, padding=1))
    unpadded = InvertedResidualConv.like(nn.Conv2d(8, 8, 3))
    assert same.use_residual and not strided.use_residual and not unpadded.use_residual


def test_unsupported_layers_are_skipped_or_raise_when_named():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3)).eval()
    converted = separable(model, SeparableConfig(init="svd", recovery="none"))
    skipped = conversion_report(converted)["skipped"]
    assert "grouped" in skipped["0"] and "1x1" in skipped["1"]
    assert isinstance(converted[2], DepthwiseSeparableConv)
    with pytest.raises(UnsupportedLayerError, match="'0'"):
        separable(model, SeparableConfig(init="svd", recovery="none", selector={"include": ["0"]}))


def test_bad_input():
    model = nn.Sequential(nn.Conv2d(8, 16, 3))
    with pytest.raises(ConfigError, match="task"):
        separable(model, SeparableConfig())
    for bad in (dict(depth_multiplier=0), dict(expansion=1), dict(block="ghost"), dict(calibration_samples=0)):
        with pytest.raises(ConfigError):
            SeparableConfig(**bad)


def test_cli_separable(tmp_path, trained_lenet5):
    from slimkit.cli.main import main

    src = sk.save(trained_lenet5, tmp_path / "lenet.safetensors")
    out = tmp_path / "mobile.safetensors"
    assert main(["separable", str(src), "--init", "svd", "--recovery", "none", "--out", str(out)]) == 0
    assert isinstance(sk.load(out).features[3], DepthwiseSeparableConv)
    assert main(["separable", str(src), "--block", "ghost", "--out", str(out)]) == 2
    assert main(["separable", str(src), "--include", "features.0", "--recovery", "none", "--out", str(out)]) == 2

"""PyTorch-native int8 through torchao PT2E + the x86 quantizer (slimkit.quantize.pt2e)."""
import pytest
import torch

import slimkit
from slimkit.errors import CalibrationError, ConfigError


@pytest.fixture(scope="module")
def pt2e_lenet(trained_lenet5, digits_task):
    from slimkit.quantize import quantize_pt2e

    return quantize_pt2e(trained_lenet5, task=digits_task, calibration_samples=256, batch_size=32)


def test_runs_real_onednn_int8_kernels(pt2e_lenet):
    kernels = pt2e_lenet.kernels()
    assert kernels.get("onednn.qconv_pointwise.default") == 2  # both LeNet-5 convolutions
    assert kernels.get("onednn.qlinear_pointwise.default") == 3  # and all three Linear layers
    assert "aten.convolution.default" not in kernels and "aten.addmm.default" not in kernels


def test_accuracy_close_to_fp32(pt2e_lenet, trained_lenet5, digits_task):
    from slimkit.core.trainer import accuracy

    fp32, int8 = accuracy(trained_lenet5, digits_task, "test"), accuracy(pt2e_lenet, digits_task, "test")
    assert abs(fp32 - int8) <= 0.01
    x = digits_task.example_input(64, split="test")
    with torch.no_grad():
        agree = (pt2e_lenet(x).argmax(1) == trained_lenet5(x).argmax(1)).float().mean().item()
    assert agree >= 0.97


def test_any_batch_size_and_input_untouched(pt2e_lenet, trained_lenet5, digits_task):
    x = digits_task.example_input(7, split="test")
    out = pt2e_lenet(x)
    assert out.shape == (7, digits_task.num_classes)
    assert torch.allclose(out[:3], pt2e_lenet(x[:3]), atol=1e-5)  # each shape lowered separately, same numerics
    assert not hasattr(trained_lenet5, "prepared")


def test_save_load_round_trip(pt2e_lenet, digits_task, tmp_path):
    path = slimkit.save(pt2e_lenet, tmp_path / "q.safetensors")
    assert b"pickle" not in path.read_bytes()[:64]
    back = slimkit.load(path)
    x = digits_task.example_input(32, split="test")
    assert type(back).__name__ == "Pt2eInt8Model"
    assert torch.allclose(back(x), pt2e_lenet(x))
    assert [s["technique"] for s in slimkit.core.state.stages(back)] == ["quantize_pt2e"]


def test_registered_as_technique(trained_lenet5, digits_task):
    from slimkit.core import registry

    tech = registry.get("quantize_pt2e")
    assert tech.runtime == "torch"
    q = slimkit.apply(trained_lenet5, tech.config_cls(calibration_samples=64, batch_size=16), task=digits_task)
    assert "onednn.qconv_pointwise.default" in q.kernels()


def test_bad_calibration_data(trained_lenet5, digits_task):
    from slimkit.quantize import quantize_pt2e

    x = digits_task.example_input(8)
    with pytest.raises(CalibrationError, match="NaN"):
        quantize_pt2e(trained_lenet5, calibration_data=torch.where(torch.arange(x.numel()).view_as(x) == 5,
                                                                    torch.tensor(float("nan")), x))
    with pytest.raises(CalibrationError, match="empty"):
        quantize_pt2e(trained_lenet5, calibration_data=x[:0])
    with pytest.raises(CalibrationError, match="calibration data"):
        quantize_pt2e(trained_lenet5)
    with pytest.raises(ConfigError):
        quantize_pt2e(trained_lenet5, calibration_data=x, batch_size=0)


def test_cli_backend_pt2e(tmp_path, capsys):
    from slimkit.cli.main import main

    out = tmp_path / "q"
    code = main(["quantize", "zoo:lenet5", "--data", "digits", "--backend", "pt2e", "--samples", "64",
                 "--batch-size", "8", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "onednn.qconv_pointwise" in printed.out and (out / "model.safetensors").is_file()
    code = main(["quantize", "zoo:lenet5", "--backend", "tflite", "--out", str(out)])
    printed = capsys.readouterr()
    assert code != 0 and "--backend" in printed.err and "Traceback" not in printed.err


class _SharedRelu(torch.nn.Module):
    """A residual block that calls one ReLU module twice, as torchvision's ResNet blocks do."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y) + y)
        return self.fc(y.mean((2, 3)))


def test_a_module_called_twice_is_quantized_and_reloads(digits_task, tmp_path):
    """Each call of the shared ReLU is its own source for the quantizer's pattern matcher (else torchao
    refuses: "Input partition has more than one output node"); both convolutions run int8 kernels."""
    from slimkit.core.state import set_source
    from slimkit.quantize import quantize_pt2e

    torch.manual_seed(0)
    model = set_source(_SharedRelu().eval(), "factory", f"{__name__}:_SharedRelu")
    q = quantize_pt2e(model, task=digits_task, calibration_samples=32)
    kernels = q.kernels()
    assert sum(v for k, v in kernels.items() if "qconv" in k) == 2
    x = digits_task.example_input(8)
    with torch.no_grad():
        assert slimkit.sqnr_db(model(x), q(x)) > 20
        loaded = slimkit.load(slimkit.save(q, tmp_path / "q.safetensors"), trust_factory=True)
        assert torch.allclose(loaded(x), q(x), atol=1e-5)

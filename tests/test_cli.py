import subprocess
import sys

import numpy as np
import pytest

from slimkit.cli.main import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_prints_all_metrics(capsys):
    code, out, err = run(capsys, "evaluate", "zoo:lenet5", "--data", "digits", "--batch-size", "1", "--batch-size", "4")
    assert code == 0, err
    for word in ("accuracy", "params", "MACs", "416,520", "bytes", "latency", "onnxruntime-cpu", "torch-eager", "batch 4"):
        assert word in out


def test_train_then_evaluate_saved_model(capsys, tmp_path):
    out_file = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "train", "zoo:lenet300_100", "--data", "digits", "--epochs", "2", "--out", str(out_file))
    assert code == 0, err
    assert "test accuracy" in out and out_file.is_file()
    code, out, err = run(capsys, "evaluate", str(out_file), "--runtime", "torch", "--batch-size", "1")
    assert code == 0, err
    acc = float(out.split("accuracy")[1].split("%")[0])
    assert acc > 80
    assert f"{out_file.stat().st_size:,} bytes" in out  # the real file's size


def _one_line_error(code, err, needle):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_bad_inputs_give_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", str(tmp_path / "missing.safetensors"))
    _one_line_error(code, err, "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run(capsys, "evaluate", str(corrupt))
    _one_line_error(code, err, "corrupt.safetensors")
    code, _, err = run(capsys, "evaluate", "zoo:alexnet")
    _one_line_error(code, err, "alexnet")
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    code, _, err = run(capsys, "train", "zoo:lenet5", "--config", str(cfg), "--out", str(tmp_path / "x.safetensors"))
    _one_line_error(code, err, "learning_rate")
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 28, 28), np.float32), y=np.zeros(0, np.int64))
    code, _, err = run(capsys, "evaluate", "zoo:lenet5", "--data", f"npz:{empty}")
    _one_line_error(code, err, "empty")
    code, _, err = run(capsys, "evaluate", "mypkg.models:net")
    _one_line_error(code, err, "--weights")
    assert not (tmp_path / "x.safetensors").exists()


def test_factory_reference_with_weights(capsys, tmp_path):
    from safetensors.torch import save_file

    from tests.helpers_factory import tiny_net

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net().state_dict().items()}, str(weights))
    code, out, err = run(capsys, "evaluate", "tests.helpers_factory:tiny_net", "--weights", str(weights),
                         "--runtime", "torch", "--batch-size", "1")
    assert code == 0, err
    assert "params        6,370" in out


def test_list_and_env(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in ("lenet5", "resnet_small", "mobilenetv2_small", "efficientnet_lite0", "minilm", "digits", "mnist:DIR"):
        assert name in out
    code, out, _ = run(capsys, "list", "--layers", "zoo:lenet5")
    assert code == 0 and "classifier.1" in out and "48,120" in out
    code, out, _ = run(capsys, "env")
    assert code == 0 and "torch" in out and "onnxruntime" in out and "cuda available" in out


@pytest.mark.parametrize("command", ["train", "evaluate", "demo", "list", "env"])
def test_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Usage" in out


def test_console_script_exit_code_and_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "slimkit.cli.main"]
    proc = subprocess.run(exe + ["evaluate", str(tmp_path / "nope.safetensors")], capture_output=True, text=True,
                          env={"SLIMKIT_PROGRESS": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: model file not found")

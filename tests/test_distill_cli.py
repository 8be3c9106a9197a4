"""`slimkit distill`: a real run that saves a reloadable student, and bad input as one line + exit 2."""
import numpy as np
import pytest

import slimkit as sk
from slimkit.cli.main import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher_file(trained_mlp, tmp_path_factory):
    return str(sk.save(trained_mlp, tmp_path_factory.mktemp("distill") / "teacher.safetensors"))


def _one_line_error(code, err, needle):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.fixture(scope="module")
def few_digits_npz(digits_task, tmp_path_factory):
    """A slice of digits as an npz data set, so the command trains for a few steps only."""
    arrays = {}
    for split, key, n in (("train", "", 256), ("val", "_val", 128), ("test", "_test", 128)):
        ds = digits_task.split(split)
        arrays["x" + key] = np.stack([ds[i][0].numpy() for i in range(n)])
        arrays["y" + key] = np.array([int(ds[i][1]) for i in range(n)])
    path = tmp_path_factory.mktemp("distill-data") / "few.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_distill_command_trains_and_saves_a_smaller_student(capsys, tmp_path, teacher_file, few_digits_npz):
    out_file = tmp_path / "student.safetensors"
    code, out, err = run(capsys, "distill", "--teacher", teacher_file, "--student", "zoo:lenet300_100", "--width",
                         "0.25", "--data", few_digits_npz, "--epochs", "8", "--lr", "3e-3", "--cache-teacher",
                         "--feature", "2=2@0.1", "--out", str(out_file))
    assert code == 0, err
    assert "teacher: test accuracy" in out and "student: test accuracy" in out and out_file.is_file()
    student = sk.load(out_file)
    assert sum(p.numel() for p in student.parameters()) < 0.3 * 266_610
    acc = float(out.split("student: test accuracy")[1].split("%")[0])
    assert acc > 50  # 32 steps of a quarter-width MLP
    assert sk.core.state.stages(student)[-1]["config"]["features"][0]["weight"] == 0.1


def test_distill_command_bad_input(capsys, tmp_path, teacher_file, few_digits_npz):
    five = sk.zoo.lenet300_100(num_classes=5)
    five_file = str(sk.save(five, tmp_path / "five.safetensors"))
    code, _, err = run(capsys, "distill", "--teacher", five_file, "--student", "zoo:lenet300_100", "--epochs", "1",
                       "--data", few_digits_npz, "--out", str(tmp_path / "s.safetensors"))
    _one_line_error(code, err, "classes")
    code, _, err = run(capsys, "distill", "--teacher", teacher_file, "--student", "zoo:lenet300_100", "--epochs", "1",
                       "--data", few_digits_npz, "--feature", "encoder.9=1", "--out", str(tmp_path / "s.safetensors"))
    _one_line_error(code, err, "'encoder.9'")
    code, _, err = run(capsys, "distill", "--teacher", teacher_file, "--student", "zoo:lenet300_100", "--feature",
                       "nonsense", "--out", str(tmp_path / "s.safetensors"))
    _one_line_error(code, err, "--feature")
    code, _, err = run(capsys, "distill", "--teacher", str(tmp_path / "missing.safetensors"), "--student",
                       "zoo:lenet5", "--out", str(tmp_path / "s.safetensors"))
    _one_line_error(code, err, "missing.safetensors")
    code, _, err = run(capsys, "distill", "--teacher", teacher_file, "--student", "zoo:lenet5", "--augment", "shift",
                       "--cache-teacher", "--out", str(tmp_path / "s.safetensors"))
    _one_line_error(code, err, "cache_teacher")
    assert not (tmp_path / "s.safetensors").exists()

"""Data-parallel runs under torchrun (2 processes, gloo on CPU) against the same job in one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimkit.core import distributed
from slimkit.quantize.calibration import TensorStats, merge_stats

JOB = Path(__file__).with_name("distributed_job.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "SLIMKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    for cmd, out in (([sys.executable, str(JOB)], one), (TORCHRUN + [str(JOB)], two)):
        done = subprocess.run(cmd + [str(out)], env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    return load(one / "rank0.pt"), load(two / "rank0.pt"), load(two / "rank1.pt")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_process_finetuning_matches_one_process(runs):
    single, rank0, rank1 = runs
    assert single["world"] == 1 and rank0["world"] == rank1["world"] == 2
    assert _max_diff(rank0["tuned"], rank1["tuned"]) == 0  # every rank ends with the same weights
    assert _max_diff(single["tuned"], rank0["tuned"]) < 1e-6  # the same global batches: float tolerance
    # validation is sharded and summed: the same scores (and early-stopping decisions) as one process
    assert [h["val_accuracy"] for h in rank0["history"]] == [h["val_accuracy"] for h in single["history"]]


def test_two_process_calibration_statistics_are_identical(runs):
    single, rank0, rank1 = runs
    assert single["stats"] and single["stats"] == rank0["stats"] == rank1["stats"]
    assert _max_diff(single["ptq"], rank0["ptq"]) == 0  # scales and zero points from the merged statistics


def test_two_process_qat_matches_one_process(runs):
    single, rank0, rank1 = runs
    assert _max_diff(rank0["qat"], rank1["qat"]) == 0
    # straight-through rounding turns float-order differences into at most a step of the grid here
    assert _max_diff(single["qat"], rank0["qat"]) < 1e-4
    assert single["accuracy"] == rank0["accuracy"] == rank1["accuracy"]


def test_cli_under_torchrun_writes_one_file_and_prints_once(tmp_path):
    out = tmp_path / "m.safetensors"
    done = subprocess.run(TORCHRUN + ["-m", "slimkit", "train", "zoo:lenet300_100", "--data", "digits",
                                      "--epochs", "1", "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # rank 1 is quiet
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_cli_under_torchrun_rejects_a_batch_that_does_not_split(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 33\n")
    done = subprocess.run(TORCHRUN + ["-m", "slimkit", "train", "zoo:lenet300_100", "--data", "digits",
                                      "--config", str(cfg), "--out", str(tmp_path / "m.safetensors")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "batch_size 33 (the global batch) does not split over 2 ranks" in done.stdout + done.stderr


def test_merged_block_statistics_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(50, generator=g) * (i + 1) for i in range(7)]
    whole = TensorStats("x")
    for b in batches:
        whole.update(b)
    blocks = []
    for part in (batches[:3], batches[3:]):
        s = TensorStats("x")
        for b in part:
            s.update(b)
        blocks.append({"x": s})
    merged = merge_stats(blocks)["x"]
    assert (merged.min, merged.max, merged.count, merged.batches) == (whole.min, whole.max, whole.count, whole.batches)
    assert torch.equal(merged.ema_min, whole.ema_min) and torch.equal(merged.ema_max, whole.ema_max)
    assert torch.equal(merged.sample.sort().values, whole.sample.sort().values)  # every value fits: the same values


def test_merged_sample_is_proportional_when_values_do_not_fit():
    a, b = TensorStats("x", sample_size=100), TensorStats("x", sample_size=100)
    a.update(torch.zeros(300))
    b.update(torch.ones(100))
    merged = merge_stats([{"x": a}, {"x": b}])["x"]
    assert merged.count == 400 and merged.sample.numel() == 100
    assert merged.sample.sum().item() == 25  # a quarter of the values were ones


def test_plain_run_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    w = distributed.world()
    assert (w.rank, w.size, w.active, w.main) == (0, 1, False, True)
    assert distributed.block_shard([1, 2, 3]) == ([1, 2, 3], False)
    assert distributed.all_gather_objects("x") == ["x"]
    t = torch.ones(2)
    assert distributed.all_reduce(t, "mean") is t and t.tolist() == [1.0, 1.0]


def test_block_shard_keeps_order(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    got = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        part, split = distributed.block_shard(list(range(8)))
        assert split
        got += part
    assert got == list(range(8))
    monkeypatch.setenv("RANK", "0")
    assert distributed.block_shard([1, 2]) == ([1, 2], False)  # fewer items than ranks: every rank takes all


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_nccl_finetuning_on_cuda(tmp_path):
    out = tmp_path / "m.safetensors"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(max(1, torch.cuda.device_count())), "-m", "slimkit", "train", "zoo:lenet5", "--data",
                           "digits", "--epochs", "2", "--device", "cuda", "--out", str(out)],
                          env={**_env(), "SLIMKIT_DIST_BACKEND": "nccl"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.split("test accuracy")[1].split("%")[0])
    assert out.is_file() and accuracy > 50

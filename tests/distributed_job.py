"""The job tests/test_distributed.py runs twice: as one process, and under `torchrun --nproc-per-node 2`
(gloo, CPU). Each rank writes what it ended with to OUT/rank{R}.pt: fine-tuned weights, QAT weights,
calibration statistics and scores. Usage: python tests/distributed_job.py OUT"""
import sys
from pathlib import Path

import torch

import slimkit as sk
from slimkit.core import distributed
from slimkit.core.task import tensor_task
from slimkit.core.trainer import TrainConfig, fit
from slimkit.quantize.ptq import batches_from, collect_activation_stats


def toy_task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 1, 4, 4, generator=g)
    y = (x[:, 0, 0, 0] > 0).long() + (x[:, 0, 1, 1] > 0).long()
    return tensor_task("toy", x[:256], y[:256], x[256:], y[256:], batch_size=32)


def main(out: Path) -> None:
    task = toy_task()
    torch.manual_seed(1)
    net = sk.zoo.lenet300_100(num_classes=3, input_size=4, width=0.1)
    tuned = fit(net, task, TrainConfig(epochs=3, lr=1e-2, patience=2), progress=False)
    torch.manual_seed(2)  # a model every rank builds alike: its calibration sees the same weights everywhere
    fixed = sk.zoo.lenet300_100(num_classes=3, input_size=4, width=0.1)
    ptq = sk.quantize(fixed, task=task, mode="static", calibration_samples=256, speed_check=False)
    stats = collect_activation_stats(ptq, batches_from(task, batch_size=32, max_samples=256))
    qat = sk.quantize(tuned.model, task=task, mode="static", qat_epochs=2, calibration_samples=256, speed_check=False)
    w = distributed.world()
    torch.save({
        "world": w.size,
        "tuned": tuned.model.state_dict(), "history": tuned.history,
        "ptq": ptq.state_dict(), "qat": qat.state_dict(),
        "stats": {k: {"min": float(s.min), "max": float(s.max), "ema_min": float(s.ema_min),
                      "ema_max": float(s.ema_max), "count": s.count, "batches": s.batches,
                      "sample": sorted(s.sample.tolist())} for k, s in stats.items()},
        "accuracy": sk.evaluate(qat, task, runtimes=()).accuracy,
    }, out / f"rank{w.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

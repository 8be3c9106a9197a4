"""An advisor run tests/test_advisor_workers.py starts as separate processes:
python tests/advisor_job.py OUT [STORAGE [worker]]. A tiny search (TINY) of a LeNet-5 trained briefly on
digits; the reporting run writes OUT/summary.json (its points and the recommendation)."""
import json
import os
import sys
from pathlib import Path

from slimkit import zoo
from slimkit.core.trainer import TrainConfig, fit
from slimkit import data
from slimkit.pipeline.advisor import AutoConfig, advise

TINY = dict(trials=6, student_epochs=2, recovery_epochs=1, max_students=1, structured_targets=[0.5], sparsities=[0.8],
            prune_epochs=1, codebook_epochs=0, latency_batch_size=8, max_accuracy_drop=100)


def main(out: Path, storage: str | None, worker: bool) -> None:
    task = data.digits()
    model = fit(zoo.for_task("lenet5", task, seed=0), task, TrainConfig(epochs=4, lr=2e-3), progress=False).model
    config = AutoConfig(**{**TINY, "trials": int(os.environ.get("ADVISOR_JOB_TRIALS", TINY["trials"]))})
    result = advise(model, task, config, out, storage=storage, study="t", worker=worker)
    if not worker:
        pareto = result["sections"]["pareto front (validation split)"]
        (out / "summary.json").write_text(json.dumps({"recommendation": result["sections"]["recommendation"]["params"],
                                                      "trials": pareto["trials"]}, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None, sys.argv[3:] == ["worker"])

"""Measurement: accuracy, fidelity, parameters, MACs, bytes on disk, latency on a named runtime."""
from slimkit.evaluate.latency import (
    Workload,
    compare_latency,
    describe_speedup,
    measure_latency,
    ort_call,
    ort_latency,
    speedup,
    torch_call,
    torch_latency,
)
from slimkit.evaluate.metrics import (
    Metrics,
    count_macs,
    count_params,
    evaluate,
    fidelity,
    predict,
    topk_accuracy,
)

__all__ = ["Metrics", "evaluate", "fidelity", "predict", "topk_accuracy", "count_params", "count_macs",
           "measure_latency", "torch_latency", "ort_latency",
           "Workload", "compare_latency", "speedup", "describe_speedup", "torch_call", "ort_call"]

from slimkit.core.verbs import make_callable  # noqa: E402

make_callable(__name__, "evaluate")  # `slimkit.evaluate(model, task)` (see core/verbs.py)

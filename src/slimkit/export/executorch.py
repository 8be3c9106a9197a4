"""ExecuTorch export (`.pte`, XNNPACK-delegated) and its runner.

    slimkit.export(model, "model.pte", example_input=task.example_input(1))

Float and structurally compressed models are captured as they are; slimkit-quantized models carry their
own integer weights and scales (`export/pt2.py`). The XNNPACK partitioner takes every pattern it has a
kernel for (int8 conv/linear/add/pool/..., fp32 otherwise); the rest runs on ExecuTorch's portable
kernels — `delegation(path)` lists them. Needs the `executorch` package (in requirements.lock).

The program has the example input's static shape: with a dynamic batch axis, ExecuTorch 1.5.1 plans
XNNPACK-delegated inputs for a batch of 15 whatever upper bound the export declares, so a batch-1 program
(the phone case) is exported for batch 1 and `ExecuTorchRunner` feeds larger inputs in chunks.
"""
from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slimkit.core.io import atomic_path, quiet_native_logs
from slimkit.errors import MissingDependencyError, ModelError, UnsupportedLayerError

def _executorch():
    try:
        import executorch  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401  (out variants of the Q/DQ ops left outside XNNPACK)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as err:
        raise MissingDependencyError(f"ExecuTorch export needs the executorch package ({err}); "
                                     "`make venv` installs it") from None
    return XnnpackPartitioner, to_edge_transform_and_lower


def export_executorch(model: nn.Module, path: str | Path, example_input: Any) -> Path:
    """Write `model` as an XNNPACK-delegated ExecuTorch program for `example_input`'s shape; returns the
    path (`delegation(path)` says what runs in XNNPACK)."""
    from slimkit.export.pt2 import capture

    partitioner, lower = _executorch()
    ep = capture(model, example_input)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = lower(ep, partitioner=[partitioner()])
            program = edge.to_executorch()
    except Exception as err:
        raise UnsupportedLayerError(f"ExecuTorch lowering of {type(model).__name__} failed: {str(err).splitlines()[0]}") from None
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(program.buffer)
    return path


def delegation(path: str | Path) -> dict[str, Any]:
    """What of a `.pte` program runs inside XNNPACK: delegate calls, and the operators left on ExecuTorch's
    portable (slow-path) kernels with their counts."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(path).read_bytes())
    program = getattr(program, "program", program)
    plan = program.execution_plan[0]
    names = [op.name + (f".{op.overload}" if op.overload else "") for op in plan.operators]
    left: collections.Counter = collections.Counter()
    delegates = 0
    for chain in plan.chains:
        for instr in chain.instructions:
            args = instr.instr_args
            kind = type(args).__name__
            if kind == "DelegateCall":
                delegates += 1
            elif kind == "KernelCall":
                left[names[args.op_index]] += 1
    backends = sorted({d.id for d in plan.delegates})
    return {"delegate_calls": delegates, "backends": backends, "portable_ops": dict(left)}


class ExecuTorchRunner:
    """Loads a `.pte` once and runs it on numpy/torch inputs (XNNPACK with `threads` threads); inputs with
    more rows than the program's batch run in chunks of it (the last one padded)."""

    runtime = "executorch-xnnpack"

    def __init__(self, path: str | Path, threads: int = 1):
        _executorch()
        from executorch.extension.pybindings import portable_lib

        try:
            with quiet_native_logs():
                self.module = portable_lib._load_for_executorch(str(path))
                self.batch = self.module.method_meta("forward").input_tensor_meta(0).sizes()[0]
                portable_lib._unsafe_reset_threadpool(threads)
        except Exception as err:
            raise ModelError(f"{Path(path).name}: not a loadable ExecuTorch program ({str(err).splitlines()[0]})") from None
        import executorch

        self.version = getattr(executorch, "__version__", None) or _dist_version("executorch")
        self.threads = threads

    def __call__(self, *inputs) -> np.ndarray:
        from slimkit.export.runtimes import in_chunks

        arrays = [np.asarray(x, dtype=np.float32) for x in inputs]
        return in_chunks(lambda chunk: self.module.forward([torch.from_numpy(np.ascontiguousarray(c)) for c in chunk])[0].numpy(),
                         arrays, self.batch)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)

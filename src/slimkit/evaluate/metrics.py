"""Accuracy, fidelity, size and cost metrics, and `evaluate` which gathers them all."""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core import distributed
from slimkit.core.task import Task
from slimkit.errors import DataError
from slimkit.evaluate.latency import torch_latency


def _call(model: nn.Module, x):
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


@torch.no_grad()
def predict(model: nn.Module, task: Task, split: str = "test", *, batch_size: int = 256):
    """Model outputs and targets over a split: (outputs, targets) concatenated on CPU. Under torchrun each
    rank runs its shard of the split and every rank gets all of it back, in the split's order."""
    from torch.utils.data import DataLoader, Subset

    from slimkit.core.trainer import check_labels, model_cannot_run

    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ds = task.split(split)
    mine, split_up = distributed.block_shard(list(range(len(ds))))
    outs, targets = [], []
    for x, y in DataLoader(Subset(ds, mine), batch_size=batch_size):
        x = x.to(device) if isinstance(x, torch.Tensor) else [t.to(device) for t in x]
        try:
            outs.append(_call(model, x).float().cpu())
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            if outs:  # the first batch ran: not a shape problem of the data
                raise
            raise model_cannot_run(model, task, err, x) from None
        targets.append(y)
    if split_up:  # the ranks' blocks in rank order are the split in order
        parts = distributed.all_gather_objects((outs, targets))
        outs, targets = [t for o, _ in parts for t in o], [t for _, ts in parts for t in ts]
    if not outs:
        raise DataError(f"data set {task.name!r}: split {split!r} is empty")
    outputs, targets = torch.cat(outs), torch.cat(targets)
    check_labels(task, outputs, targets)
    return outputs, targets


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (fractions) for each k that is <= the number of classes."""
    result = {}
    for k in ks:
        if k > logits.shape[1]:
            continue
        topk = logits.topk(k, dim=1).indices
        result[f"top{k}"] = (topk == targets[:, None]).any(1).float().mean().item()
    return result


def fidelity(outputs: torch.Tensor, reference: torch.Tensor, *, kind: str = "logits") -> dict[str, float]:
    """How closely `outputs` follow `reference` outputs on the same inputs.

    kind="logits": top-1 agreement and mean KL(reference || outputs) of the softmaxes.
    kind="embedding": mean and min cosine similarity.
    """
    if outputs.shape != reference.shape:
        raise DataError(f"fidelity: output shape {tuple(outputs.shape)} differs from reference {tuple(reference.shape)}")
    outputs, reference = outputs.float(), reference.float()
    if kind == "embedding":
        cos = F.cosine_similarity(outputs, reference, dim=1)
        return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}
    agree = (outputs.argmax(1) == reference.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(outputs, 1), F.log_softmax(reference, 1), log_target=True, reduction="batchmean")
    return {"top1_agreement": agree, "kl_mean": kl.item()}


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters (plus floating buffers that are weights, e.g. packed/quantized weights) and
    how many of them are non-zero."""
    total = nonzero = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"params": total, "nonzero_params": nonzero}


def count_macs(model: nn.Module, example) -> int:
    """Multiply-accumulates of one forward pass on `example` (batch included), counted with
    torch's FlopCounterMode (dense: zeros in weights still count)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _call(model, example)
    return int(counter.get_total_flops() // 2)


@dataclass
class Metrics:
    """Everything measured about one model. Fractions for accuracies, bytes, milliseconds."""

    accuracy: float | None = None
    top5: float | None = None
    fidelity: dict[str, float] = field(default_factory=dict)
    params: int = 0
    nonzero_params: int = 0
    macs: int = 0
    size_bytes: int | None = None
    artifact: str | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def latency_ms(self, runtime: str | None = None, batch_size: int | None = None) -> float | None:
        for row in self.latency:
            if (runtime is None or row["runtime"].startswith(runtime)) and (batch_size is None or row["batch_size"] == batch_size):
                return row["median_ms"]
        return None

    def __str__(self) -> str:
        lines = []
        if self.accuracy is not None:
            lines.append(f"accuracy      {100 * self.accuracy:.2f}%" + (f" (top-5 {100 * self.top5:.2f}%)" if self.top5 is not None else ""))
        for k, v in self.fidelity.items():
            lines.append(f"{k:<14}{v:.4f}")
        lines.append(f"params        {self.params:,} ({self.nonzero_params:,} non-zero)")
        lines.append(f"MACs          {self.macs:,} (batch 1)")
        if self.size_bytes is not None:
            lines.append(f"size          {self.size_bytes:,} bytes ({self.artifact})")
        for row in self.latency:
            lines.append(f"latency       {row['median_ms']:.3f} ms median  [{row['runtime']} {row['version']}, "
                         f"{row['threads']} thread(s), batch {row['batch_size']}, {row['runs']} runs]")
        lines.extend(f"note          {n}" for n in self.notes)
        return "\n".join(lines)


def evaluate(
    model: nn.Module,
    task: Task,
    *,
    split: str = "test",
    reference: nn.Module | None = None,
    artifact: str | Path | None = None,
    runtimes: Iterable[str] = ("torch",),
    onnx_path: str | Path | None = None,
    files: dict[str, str | Path] | None = None,
    threads: int = 1,
    batch_sizes: Iterable[int] = (1, 64),
    latency_runs: int = 30,
) -> Metrics:
    """Measure `model` on `task`.

    accuracy/top-5 (classification tasks) and, with `reference`, fidelity to it; parameters and
    non-zeros; MACs at batch 1; `size_bytes` of `artifact` (a file already written) or, if None,
    of a fresh `slimkit.save` of the model; latency for each runtime at each batch size, `threads` threads:
    "torch" (eager), "ort" (ONNX Runtime: `onnx_path`), "openvino", "executorch" (XNNPACK), "litert" — each
    from `files[runtime]` when given, else from a fresh export of the model (`slimkit.export`: int8 for a
    quantized model). ExecuTorch and LiteRT programs have static shapes: one is exported per batch size.
    Their rows say that they were timed on this host, which does not predict a phone.
    Under torchrun the scores come from every rank's shard; latency from rank 0 alone (other ranks would
    disturb its timing: `compare_latency`), sent to every rank.
    """
    from slimkit.errors import ConfigError

    batch_sizes, runtimes = list(batch_sizes), list(runtimes)
    if threads < 1 or latency_runs < 1 or any(bs < 1 for bs in batch_sizes):
        raise ConfigError(f"evaluate: threads ({threads}), latency_runs ({latency_runs}) and batch sizes "
                          f"({batch_sizes}) must be >= 1")
    from slimkit.export.runtimes import SUFFIX

    unknown = [rt for rt in runtimes if rt != "torch" and rt not in SUFFIX]
    if unknown:
        raise DataError(f"unknown runtime {unknown[0]!r}; use one of torch, {', '.join(SUFFIX)}")
    files = dict(files or {})
    if onnx_path is not None:
        files.setdefault("ort", onnx_path)
    model = model.eval()
    m = Metrics()
    if task.metric == "accuracy":
        logits, targets = predict(model, task, split)
        acc = topk_accuracy(logits, targets)
        m.accuracy, m.top5 = acc.get("top1"), acc.get("top5")
        if reference is not None:
            ref_logits, _ = predict(reference, task, split)
            m.fidelity = fidelity(logits, ref_logits)
    elif reference is not None:
        outs, _ = predict(model, task, split)
        ref, _ = predict(reference, task, split)
        m.fidelity = fidelity(outs, ref, kind="embedding")
    _measure(m, model, task, artifact, runtimes, files, threads, batch_sizes, latency_runs)
    return m


def _measure(m: Metrics, model, task, artifact, runtimes, files, threads, batch_sizes, latency_runs) -> None:
    """Parameters, MACs, bytes on disk and latency into `m`."""
    from slimkit.core.artifact import save
    from slimkit.export import export
    from slimkit.export.runtimes import MOBILE, SUFFIX, workload
    from slimkit.evaluate.latency import measure_latency

    m.params, m.nonzero_params = count_params(model).values()
    m.macs = count_macs(model, task.example_input(1))
    with tempfile.TemporaryDirectory() as tmp:
        if artifact is None:
            artifact = save(model, Path(tmp) / "model.safetensors")
            m.artifact = "slimkit safetensors (fp32 dense, temporary)"
        else:
            m.artifact = str(artifact)
        m.size_bytes = Path(artifact).stat().st_size
        for bs in batch_sizes:
            example = task.example_input(bs)
            for rt in runtimes:
                if rt == "torch":
                    m.latency.append(torch_latency(model, example, threads=threads, runs=latency_runs))
                    continue
                path = files.get(rt)
                if path is None or (rt in MOBILE and bs != 1):  # static-shape programs: one per batch size
                    path = Path(tmp) / f"model_b{bs if rt in MOBILE else 1}{SUFFIX[rt]}"
                    if not path.exists():
                        export(model, path, example_input=task.example_input(bs if rt in MOBILE else 1))
                m.latency.append(measure_latency(workload(path, example, threads=threads), runs=latency_runs))

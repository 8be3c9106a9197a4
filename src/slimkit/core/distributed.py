"""Data-parallel runs started by `torchrun`: the process group, sharding and the reductions.

    torchrun --nproc-per-node 2 -m slimkit train zoo:lenet5 --data digits --epochs 5

Every rank runs the same program (SPMD). The shared trainer wraps the model in
`DistributedDataParallel` and gives each rank its part of every global batch
(`DistributedSampler`); evaluation and calibration passes shard their batches and reduce the
results, so every rank ends with the same model and the same numbers. Rank 0 writes files
(`core.io.atomic_path`: the others wait until it has), prints and times; the others stay quiet.
Without torchrun (WORLD_SIZE unset or 1) nothing here does anything.

Backends: NCCL when training on CUDA, gloo on CPU (SLIMKIT_DIST_BACKEND overrides).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimkit.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer (set by torchrun; unset it for a 1-process run)") from None


def world() -> World:
    """This process's place in the run: from the process group when one is up, else from torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is World(0, 1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def setup(device: torch.device | None = None) -> World:
    """Join the process group when started by torchrun (idempotent); returns the world."""
    w = world()
    if not w.active or dist.is_initialized():
        return w
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError("WORLD_SIZE > 1 but no MASTER_ADDR: start data-parallel runs with torchrun")
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    backend = os.environ.get("SLIMKIT_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group(backend=backend)
    return world()


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (LOCAL_RANK) when training on CUDA."""
    w = world()
    if w.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", w.local_rank % torch.cuda.device_count())
    return device


def _joined() -> bool:
    """True under torchrun (joining the process group on first use), False in a plain run."""
    if not world().active:
        return False
    setup()
    return True


def barrier() -> None:
    if _joined():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place reduction over the ranks (sum, min, max, mean); a plain run returns `tensor` as is."""
    if not _joined():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}
    moved = _on_backend_device(tensor)
    dist.all_reduce(moved, op=ops[op])
    if op == "mean":
        moved /= world().size
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a plain run: [obj])."""
    if not _joined():
        return [obj]
    out: list = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def block_shard(items: list) -> tuple[list, bool]:
    """This rank's contiguous block of `items` (rank 0 the first block, ...), so that the ranks' blocks in
    rank order are `items` in order; and whether it was split (only then are the ranks' results to be
    combined). Fewer items than ranks: every rank takes all."""
    w = world()
    if not w.active or len(items) < w.size:
        return items, False
    bounds = [len(items) * r // w.size for r in range(w.size + 1)]
    return items[bounds[w.rank]:bounds[w.rank + 1]], True


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.cuda()
    if dist.get_backend() == "gloo" and tensor.device.type != "cpu":
        return tensor.cpu()
    return tensor


def data_parallel(model: torch.nn.Module, device: torch.device, *, unused_parameters: bool = False) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel under torchrun (the model itself otherwise). Rank 0's
    weights are broadcast when wrapping; `unused_parameters` for models whose forward leaves some
    parameters out (a supernet's sampled paths). Batch norm normalizes over each rank's part of the batch, as in plain DDP (the
    trainer gives every rank rank 0's running statistics after each epoch): a model with batch norm matches
    a 1-process run in distribution, not to float tolerance; one without it does."""
    if not _joined() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused_parameters)


def average_gradients(params: list) -> None:
    """Average the gradients of parameters outside a DDP module (adapters, codebooks) over the ranks."""
    if not _joined():
        return
    for p in params:
        if p.grad is not None:
            all_reduce(p.grad, "mean")


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank, so all score and save the same model."""
    if not _joined():
        return
    for buf in model.buffers():
        moved = _on_backend_device(buf.data)
        dist.broadcast(moved, src=0)
        if moved is not buf.data:
            buf.data.copy_(moved)


def quiet_other_ranks() -> None:
    """Under torchrun, ranks other than 0 print nothing and show no progress (rank 0 speaks for the run)."""
    import sys

    w = world()
    if w.active and not w.main:
        os.environ["SLIMKIT_PROGRESS"] = "0"
        sys.stdout = open(os.devnull, "w")
        sys.stderr = open(os.devnull, "w")

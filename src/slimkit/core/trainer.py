"""The one shared trainer: fine-tuning, distillation, QAT and NAS candidates all run through it.

    model = slimkit.train(model, task, epochs=10)

Optimizer and LR schedule, early stopping on validation, seed control, a progress bar, CUDA
when available; the same seed gives the same weights on CUDA too (`deterministic`, default on:
deterministic cuDNN/cuBLAS kernels while training, restored afterwards). Techniques customize it
through `loss` (e.g. distillation), `extra_parameters` (e.g. adapters), and hooks (`on_step`,
`on_epoch` — e.g. pruning masks and schedules).

Started by torchrun (`slimkit.core.distributed`), it trains data-parallel: DistributedDataParallel,
each rank a slice of every global batch (`batch_size` stays the global batch), gradients of extra
parameters averaged too, validation sharded and summed; every rank ends with the same weights.
"""
from __future__ import annotations

import copy
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal, Union

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from slimkit.core import distributed
from slimkit.core.config import Config
from slimkit.core.progress import progress_bar
from slimkit.core.task import Task
from slimkit.errors import DataError


class TrainConfig(Config):
    """How to train. `patience` enables early stopping on validation accuracy (None: off).
    `deterministic`: on CUDA, use deterministic kernels so the same seed gives the same weights (pipeline
    resume and seed comparisons rely on it; a few percent slower). On CPU training is deterministic anyway."""

    epochs: int = Field(10, ge=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    batch_size: int | None = Field(None, gt=0)
    patience: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, gt=0)
    seed: int = 0
    device: str = "auto"
    grad_clip: float | None = Field(None, gt=0)
    deterministic: bool = True


# early stopping as the stages' configs take it: epochs, "auto" (see `auto_patience`) or None (off)
Patience = Union[Annotated[int, Field(ge=1)], Literal["auto"], None]


def auto_patience(patience: int | str | None, epochs: int, task: Task | None) -> int | None:
    """The early-stopping patience a run uses: "auto" is max(5, epochs // 3) epochs where the task has a
    validation split (so `epochs` is a maximum and the best validation epoch's weights are kept; with
    fewer epochs than that it only keeps the best epoch), None without one; numbers and None as given."""
    if patience == "auto":
        return max(5, epochs // 3) if task is not None and task.val is not None else None
    return patience  # type: ignore[return-value]


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'; asking for CUDA without it is a ConfigError."""
    from slimkit.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here (torch {torch.__version__}); "
                          "use --device cpu or auto")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu or cuda")
    return resolved


@contextmanager
def deterministic_kernels(device: torch.device, enabled: bool = True):
    """Deterministic cuDNN/cuBLAS kernels on CUDA inside the block (the previous settings come back after).
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when the process first uses it, so it is set (if unset) here."""
    if not enabled or device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before[0], before[1]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


def move_batch(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch


def model_cannot_run(model: nn.Module, task: Task, err: Exception, x) -> DataError:
    """The typed error for a model whose forward fails on the task's inputs (wrong rank, channels, size)."""
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"{type(model).__name__} cannot run on data set {task.name!r}: inputs of shape {shape} "
                     f"(model expects something else: {first})")


def check_labels(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Classification labels must index the model's outputs: a label past the last logit would be
    scored as always wrong (or crash the loss), a silent wrong answer."""
    if task.metric != "accuracy" or outputs.ndim != 2 or targets.is_floating_point() or not len(targets):
        return
    if int(targets.max()) >= outputs.shape[1]:
        raise DataError(f"data set {task.name!r} has label {int(targets.max())}, but the model outputs only "
                        f"{outputs.shape[1]} classes (0..{outputs.shape[1] - 1}): use a model built for "
                        f"{task.num_classes or int(targets.max()) + 1} classes or relabel the data")


@torch.no_grad()
def check_model_fits(model: nn.Module, task: Task, device: torch.device, split: str = "train") -> None:
    """One forward on two examples before long work: inputs the model cannot take, or more classes
    than it outputs, fail here with a typed error instead of a traceback (or a wrong score) later."""
    from torch.utils.data import default_collate

    ds = task.split(split)  # two examples without a DataLoader iterator, which would draw from the global RNG
    x, y = move_batch(default_collate([ds[i] for i in range(min(2, len(ds)))]), device)
    was_training = model.training
    model.eval()  # no batch-norm statistics move
    try:
        out = model(*x) if isinstance(x, (tuple, list)) else model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise model_cannot_run(model, task, err, x) from None
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and task.num_classes and task.metric == "accuracy" and out.ndim == 2 \
            and out.shape[1] < task.num_classes:
        raise DataError(f"data set {task.name!r} has {task.num_classes} classes, but the model outputs only "
                        f"{out.shape[1]}: use a model built for {task.num_classes} classes")
    if isinstance(out, torch.Tensor):
        check_labels(task, out.cpu(), y.cpu() if isinstance(y, torch.Tensor) else torch.zeros(0))


@torch.no_grad()
def accuracy(model: nn.Module, task: Task, split: str = "val", device: torch.device | None = None) -> float:
    """Top-1 accuracy (fraction) of `model` on a split; keeps the model's train/eval mode. Under torchrun
    each rank scores its shard of the split and the counts are summed (every rank gets the same value)."""
    from torch.utils.data import DataLoader, Subset

    was_training = model.training
    model.eval()
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    ds = task.split(split)
    mine, split_up = distributed.block_shard(list(range(len(ds))))
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in DataLoader(Subset(ds, mine), batch_size=256):
        x, y = x.to(device), y.to(device)
        counts += torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    model.train(was_training)
    correct, total = (distributed.all_reduce(counts) if split_up else counts).tolist()
    if total == 0:
        raise DataError(f"data set {task.name!r}: split {split!r} is empty")
    return correct / total


def _train_loader(task: Task, cfg: TrainConfig, world: distributed.World):
    """Shuffled batches of the training split; epoch e is shuffled with seed + e. Under torchrun each rank
    gets batch_size / ranks examples of every global batch (together exactly the 1-process batch)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from slimkit.errors import ConfigError

    ds = task.split("train")
    batch = cfg.batch_size or task.batch_size
    if batch % world.size:
        raise ConfigError(f"batch_size {batch} (the global batch) does not split over {world.size} ranks; "
                          f"use a multiple of {world.size}")
    sampler = DistributedSampler(ds, num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.seed)
    return DataLoader(ds, batch_size=batch // world.size, sampler=sampler)


def _make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    task: Task,
    config: TrainConfig | None = None,
    *,
    loss: LossFn | None = None,
    extra_parameters: list[nn.Parameter] | None = None,
    on_step: Callable[[nn.Module, int], None] | None = None,
    on_epoch: Callable[[nn.Module, int], None] | None = None,
    description: str = "train",
    progress: bool = True,
    in_place: bool = False,
    unused_parameters: bool = False,
) -> TrainResult:
    """Train `model` on `task.train`; returns a TrainResult with the (new) trained model.

    loss(model, x, y) -> scalar overrides the task loss (used by distillation). on_step(model, step)
    runs after every optimizer step, on_epoch(model, epoch) after every epoch (used by pruning
    schedules and masks). With `patience`, the weights of the best validation epoch are kept (the latest of
    equally good ones).
    The model is returned on the device it came from. `unused_parameters`: the forward may leave some
    parameters without a gradient (a supernet's sampled paths); data-parallel runs need to know.
    """
    cfg = config or TrainConfig()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    world = distributed.setup(device)
    device = distributed.local_device(device)
    src_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if not in_place:
        from slimkit.core.state import copy_model

        model = copy_model(model)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters or [])
    if not params:
        raise DataError("nothing to train: the model has no trainable parameters")
    if loss is None:  # a custom loss (distillation, NAS) knows its own inputs
        check_model_fits(model, task, device)
    optimizer = _make_optimizer(params, cfg)
    loader = _train_loader(task, cfg, world)
    net = distributed.data_parallel(model, device, unused_parameters=unused_parameters)  # the model itself when not under torchrun
    extra = [p for p in (extra_parameters or []) if p.requires_grad]
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1))))
    elif cfg.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total_steps // 3), gamma=0.1)
    else:
        scheduler = None

    def default_loss(m, x, y):  # m: the model, or its DistributedDataParallel wrapper
        return task.loss(m(x), y)

    loss_fn = loss or default_loss
    history: list[dict[str, float]] = []
    has_val = task.val is not None and task.metric == "accuracy"
    best_acc, best_state, best_epoch, bad_epochs = -1.0, None, None, 0
    step = 0
    bar = progress_bar(description, total_steps if progress and world.main else 0)
    with deterministic_kernels(device, cfg.deterministic), bar as advance:
        for epoch in range(cfg.epochs):
            model.train()
            loader.sampler.set_epoch(epoch)
            running, count = 0.0, 0
            for batch in loader:
                if step >= total_steps:
                    break
                x, y = move_batch(batch, device)
                optimizer.zero_grad(set_to_none=True)
                value = loss_fn(net, x, y)
                mean_loss = distributed.all_reduce(value.detach().clone(), "mean")  # one decision on every rank
                if not torch.isfinite(mean_loss):
                    raise DataError(f"{description}: loss became {mean_loss.item()} at step {step}; lower the learning rate")
                value.backward()
                distributed.average_gradients(extra)  # DDP averages the model's; extra parameters are outside it
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                running += mean_loss.item() * len(y)
                count += len(y)
                if on_step is not None:
                    on_step(model, step)
                advance(1, epoch=epoch + 1, loss=running / count)
            if on_epoch is not None:
                on_epoch(model, epoch)
            distributed.sync_buffers(model)  # rank 0's batch-norm statistics everywhere, before scoring
            record = {"epoch": epoch + 1, "train_loss": running / max(count, 1)}
            if has_val:
                record["val_accuracy"] = accuracy(model, task, "val", device)
                # a tie keeps the later weights (trained further down the schedule, same validation accuracy)
                # but does not reset the patience: only an improvement does
                if record["val_accuracy"] >= best_acc:
                    bad_epochs = 0 if record["val_accuracy"] > best_acc else bad_epochs + 1
                    best_acc, best_epoch = record["val_accuracy"], epoch + 1
                    if cfg.patience is not None:
                        best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
            history.append(record)
            if cfg.patience is not None and bad_epochs >= cfg.patience:
                break
            if step >= total_steps:
                break
    del net  # the DDP wrapper's hooks go with it
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    model.to(src_device)
    return TrainResult(model=model, history=history, best_epoch=best_epoch)


def train(model: nn.Module, task: Task, config: TrainConfig | None = None, **kwargs) -> nn.Module:
    """Train and return a new model. Keyword arguments are TrainConfig fields.

        model = slimkit.train(model, task, epochs=10, lr=1e-3)
    """
    if config is None:
        config = TrainConfig(**kwargs)
    elif kwargs:
        config = TrainConfig(**{**config.to_dict(), **kwargs})
    return fit(model, task, config).model

"""`Task`: the data (train / val / test / calibration) plus the loss and the metric.

Every technique that needs data takes a Task; nothing else carries data around.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from slimkit.errors import DataError


def _check_dataset(name: str, split: str, ds: Dataset | None) -> None:
    if ds is None:
        return
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"data set {name!r}: split {split!r} has no length") from None
    if n == 0:
        raise DataError(f"data set {name!r}: split {split!r} is empty")


@dataclass
class Task:
    """Data and objective for training and evaluation.

    name: data set name (shown in reports).
    train/val/test: datasets yielding `(x, y)`; val and test may be None (test falls back to val).
    calibration: dataset for quantization calibration (defaults to a slice of train).
    num_classes: number of classes for classification tasks (None for e.g. embeddings).
    input_shape: shape of one example without the batch dimension, e.g. (1, 28, 28).
    metric: "accuracy" (classification) or "cosine" (embeddings, compared to a reference).
    loss: callable(outputs, targets) -> scalar; default cross-entropy.
    batch_size: default batch size for loaders.
    """

    name: str
    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None
    calibration: Dataset | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] = ()
    metric: str = "accuracy"
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    batch_size: int = 64
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train is None:
            raise DataError(f"data set {self.name!r}: no training split")
        for split in ("train", "val", "test", "calibration"):
            _check_dataset(self.name, split, getattr(self, split))
        if self.calibration is None:
            n = min(len(self.train), 512)  # type: ignore[arg-type]
            self.calibration = Subset(self.train, list(range(n)))
        if not self.input_shape:
            x, _ = self.train[0]
            self.input_shape = tuple(x.shape)

    def split(self, name: str) -> Dataset:
        """Return a split by name; 'test' falls back to 'val', then to 'train'."""
        order = {"train": ["train"], "val": ["val", "train"], "test": ["test", "val", "train"],
                 "calibration": ["calibration"]}
        if name not in order:
            raise DataError(f"unknown split {name!r}; use train, val, test or calibration")
        for candidate in order[name]:
            ds = getattr(self, candidate)
            if ds is not None:
                return ds
        raise DataError(f"data set {self.name!r} has no {name!r} split")

    def loader(self, split: str = "train", *, batch_size: int | None = None, shuffle: bool = False,
               seed: int = 0, drop_last: bool = False) -> DataLoader:
        ds = self.split(split)
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(ds, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=gen, drop_last=drop_last)

    def example_input(self, batch_size: int = 1, split: str = "val") -> torch.Tensor:
        """A real batch of inputs (repeated if the split is smaller than the batch)."""
        ds = self.split(split)
        xs = [ds[i % len(ds)][0] for i in range(batch_size)]  # type: ignore[arg-type]
        return torch.stack(xs)

    def calibration_batches(self, *, batch_size: int | None = None, max_samples: int | None = None):
        """Yield input batches from the calibration split (inputs only)."""
        ds = self.calibration
        if max_samples is not None:
            ds = Subset(ds, list(range(min(max_samples, len(ds)))))  # type: ignore[arg-type]
        for x, _ in DataLoader(ds, batch_size=batch_size or self.batch_size):
            yield x


def _check_labels(name: str, labels: dict[str, Any], num_classes: int | None) -> int | None:
    """Integer labels must be classes 0..K-1. Returns K (inferred from the labels when not given);
    negative labels, labels >= num_classes, or gaps (classes without a single example, which would
    silently widen the model) are DataErrors."""
    ints = {split: torch.as_tensor(y) for split, y in labels.items() if y is not None and len(y)}
    ints = {split: y for split, y in ints.items() if not y.is_floating_point() and not y.is_complex() and y.ndim == 1}
    if not ints:
        return num_classes
    for split, y in ints.items():
        if int(y.min()) < 0:
            raise DataError(f"data set {name!r}: split {split!r} has the negative label {int(y.min())}; "
                            "classification labels must be 0..K-1")
        if num_classes is not None and int(y.max()) >= num_classes:
            raise DataError(f"data set {name!r}: split {split!r} has the label {int(y.max())}, outside its "
                            f"{num_classes} classes (0..{num_classes - 1})")
    if num_classes is None:
        present = torch.unique(torch.cat([y.long() for y in ints.values()]))
        num_classes = int(present.max()) + 1
        if len(present) != num_classes:
            missing = sorted(set(range(num_classes)) - set(present.tolist()))
            raise DataError(f"data set {name!r}: labels are not 0..K-1: classes {missing[:8]}"
                            f"{' ...' if len(missing) > 8 else ''} have no example in any split (largest label "
                            f"{num_classes - 1}); relabel them to 0..{len(present) - 1}")
    return num_classes


def tensor_task(name: str, x_train, y_train, x_val=None, y_val=None, x_test=None, y_test=None,
                *, num_classes: int | None = None, **kwargs: Any) -> Task:
    """Build a Task from tensors."""
    def ds(x, y):
        if x is None:
            return None
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if len(x) != len(y):
            raise DataError(f"data set {name!r}: {len(x)} inputs but {len(y)} labels")
        return TensorDataset(x, y)

    num_classes = _check_labels(name, {"train": y_train, "val": y_val, "test": y_test}, num_classes)
    return Task(name=name, train=ds(x_train, y_train), val=ds(x_val, y_val), test=ds(x_test, y_test),
                num_classes=num_classes, **kwargs)

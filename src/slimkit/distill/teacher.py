"""The frozen teacher: its own copy in eval mode without gradients, on its own device, with an
optional cache of its outputs for inputs it has already seen."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from slimkit.core.state import copy_model
from slimkit.distill.modules import FeatureCapture


def _row_keys(x: torch.Tensor) -> list[bytes]:
    """One exact key per example: a digest of its bytes (a cache hit needs a bit-identical input)."""
    rows = x.detach().to("cpu").contiguous().reshape(len(x), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


class FrozenTeacher:
    """Runs the teacher for distillation; the caller's model is never touched.

    The teacher is copied (so its mode, device and requires_grad flags stay as the caller left
    them), put in eval mode (dropout off, BatchNorm statistics frozen) with gradients disabled, and
    moved to `device`. Calling it with a batch on any device returns (logits, features) on that
    batch's device; `feature_names` are teacher layers whose outputs are captured.

    With `cache=True`, outputs are stored per example (on the CPU) keyed by the example's bytes; a
    batch whose examples were all seen before is served from the cache without running the teacher.
    That is exact for fixed inputs and useless (but harmless) under random augmentation.
    """

    def __init__(self, teacher: nn.Module, device: torch.device, *, feature_names: list[str] = (),
                 cache: bool = False):
        self.model = copy_model(teacher).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.feature_names = list(dict.fromkeys(feature_names))
        self.capture = FeatureCapture(self.model, self.feature_names, detach=True) if self.feature_names else None
        self.cache: dict[bytes, tuple[torch.Tensor, list[torch.Tensor]]] | None = {} if cache else None
        self.calls = 0  # teacher forward passes actually run
        self.hits = self.misses = 0  # examples served from / added to the cache

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the teacher (no cache): logits and captured features on the teacher's device."""
        self.calls += 1
        logits = self.model(x.to(self.device))
        feats = [self.capture.outputs[n] for n in self.feature_names] if self.capture else []
        return logits, feats

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cache is None:
            logits, feats = self.run(x)
        else:
            keys = _row_keys(x)
            entries = [self.cache.get(k) for k in keys]
            if all(e is not None for e in entries):
                self.hits += len(keys)
                logits = torch.stack([e[0] for e in entries])
                feats = [torch.stack([e[1][i] for e in entries]) for i in range(len(self.feature_names))]
            else:  # run the whole batch once and remember every example
                logits, feats = self.run(x)
                cpu_logits, cpu_feats = logits.cpu(), [f.cpu() for f in feats]
                for i, k in enumerate(keys):
                    if k not in self.cache:
                        self.misses += 1
                        self.cache[k] = (cpu_logits[i].clone(), [f[i].clone() for f in cpu_feats])
                    else:
                        self.hits += 1
        target = x.device
        return logits.to(target), {n: f.to(target) for n, f in zip(self.feature_names, feats)}

    def close(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        self.cache = None

"""Deep Compression (Han et al. 2016): prune -> quantize with shared weights -> entropy-code.

    small = slimkit.pack(model, "out/model.slim", slimkit.PackConfig(prune=slimkit.PruneConfig(sparsity=0.9)), task=task)

`quantize_values` replaces the non-zero weights of every selected layer by at most 2**bits - 1 shared
values (k-means with linear initialisation, or uniform levels), optionally fine-tunes the shared
values (the codebook) on the task, and rounds the codebook to float16 so the model in memory is
exactly the model the `.slim` file restores. `write_packed` then stores it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.registry import chained
from slimkit.core.selector import get_submodule
from slimkit.core.state import copy_model, record_stage
from slimkit.core.task import Task
from slimkit.errors import ConfigError
from slimkit.prune.config import PackConfig
from slimkit.prune.masks import prunable_layers


def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means with linear initialisation over [min, max] (the best init in Deep Compression:
    it keeps the rare large weights). Returns (centroids, code of every value)."""
    if values.numel() <= clusters:
        centroids, codes = torch.unique(values, return_inverse=True)
        return centroids, codes
    centroids = torch.linspace(values.min().item(), values.max().item(), clusters, dtype=values.dtype)
    for _ in range(iterations):
        bounds = (centroids[1:] + centroids[:-1]) / 2
        codes = torch.bucketize(values, bounds)
        sums = torch.zeros(clusters, dtype=values.dtype).index_add_(0, codes, values)
        counts = torch.bincount(codes, minlength=clusters).to(values.dtype)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        updated, _ = torch.sort(updated)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    bounds = (centroids[1:] + centroids[:-1]) / 2
    return centroids, torch.bucketize(values, bounds)


def linear_levels(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric uniform quantization to 2**bits - 1 levels (zero included). Returns (levels, codes)."""
    half = (1 << (bits - 1)) - 1 if bits > 1 else 1
    scale = values.abs().max().clamp(min=1e-12) / half
    ints = torch.round(values / scale).clamp(-half, half)
    levels = torch.arange(-half, half + 1, dtype=values.dtype) * scale
    return levels, (ints + half).long()


def _to_half_grid(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def _tensor(model: nn.Module, path: str) -> torch.Tensor:
    """The tensor at "layer.weight" / "layer.bias" (through the module's attribute, as a parametrization sees it)."""
    module, attr = path.rsplit(".", 1)
    return getattr(get_submodule(model, module), attr)


class _Codebooks:
    """Shared values per parameter ("conv.weight", "fc.bias"): codes of the non-zero positions and a
    trainable codebook."""

    def __init__(self):
        self.layers: dict[str, dict[str, Any]] = {}

    def add(self, path: str, tensor: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> None:
        mask = tensor != 0
        self.layers[path] = {"mask": mask, "codes": codes, "codebook": nn.Parameter(centroids.clone())}

    def value(self, path: str) -> torch.Tensor:
        layer = self.layers[path]
        w = torch.zeros(layer["mask"].shape, dtype=layer["codebook"].dtype, device=layer["codebook"].device)
        return w.masked_scatter(layer["mask"], layer["codebook"][layer["codes"]])

    @torch.no_grad()
    def write(self, model: nn.Module) -> None:
        for path, layer in self.layers.items():
            layer["codebook"].copy_(_to_half_grid(layer["codebook"]))  # the .slim stores it as float16
            _tensor(model, path).copy_(self.value(path))

    @torch.no_grad()
    def read(self, model: nn.Module) -> None:
        """Codebooks back from values that `write` produced (after early stopping restored an epoch)."""
        for path, layer in self.layers.items():
            values = _tensor(model, path).detach()[layer["mask"]].to(layer["codebook"].dtype)
            layer["codebook"].scatter_(0, layer["codes"], values)


def build_codebooks(model: nn.Module, layers: list[tuple[str, nn.Module]], bits: dict[str, int],
                    quantization: str = "kmeans", bias_bits: dict[str, int] | None = None) -> _Codebooks:
    """Shared values of the non-zero weights of every layer in `layers` with `bits[name]`-bit codes
    (at most 2**bits - 1 values: code 0 is the zero), and of the biases of the layers in `bias_bits`."""
    books = _Codebooks()
    for name, module in layers:
        todo = [("weight", bits.get(name))] + [("bias", (bias_bits or {}).get(name))]
        for attr, b in todo:
            tensor = getattr(module, attr, None)
            if b is None or tensor is None:
                continue
            tensor = tensor.detach()
            values = tensor[tensor != 0].float()
            if values.numel() == 0:
                continue
            if quantization == "kmeans":
                centroids, codes = kmeans_1d(values, (1 << b) - 1)
            else:
                centroids, codes = linear_levels(values, b)
            books.add(f"{name}.{attr}", tensor, centroids, codes)
    return books


def finetune_codebooks(model: nn.Module, books: _Codebooks, task: Task, *, epochs: int, lr: float, seed: int = 0,
                       patience: int | None = None) -> nn.Module:
    """Train the shared values (Deep Compression sec. 3.3): the gradient of a centroid is the sum of
    the gradients of the weights that share it, which autograd gives through the gather. With
    `patience`, stops on validation accuracy and keeps the best epoch's codebooks."""
    from torch.func import functional_call

    from slimkit.core.trainer import TrainConfig, fit

    for path in books.layers:
        _tensor(model, path).requires_grad_(False)

    def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shared = {path: books.value(path) for path in books.layers}
        return task.loss(functional_call(m, shared, (x,)), y)

    def shared_weights(m: nn.Module, epoch: int) -> None:
        books.write(m)  # validation (and the best-epoch copy) see the weights the file will hold

    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, device="cpu", patience=patience)
    result = fit(model, task, cfg, loss=loss, extra_parameters=[b["codebook"] for b in books.layers.values()],
                 on_epoch=shared_weights, description="pack: codebook fine-tune").model
    books.read(result)
    for p in result.parameters():
        p.requires_grad_(True)
    return result


@chained("pack")
def quantize_values(model: nn.Module, config: PackConfig | None = None, *, task: Task | None = None) -> nn.Module:
    """The `pack` technique: (optional pruning,) shared-value quantization of the selected layers,
    codebook fine-tuning; returns a new model whose weights are exactly what the `.slim` file holds.
    With `config.budget`, per-layer sparsity and bits are searched instead (`slimkit.prune.deep`)."""
    config = config or PackConfig()
    if config.codebook_epochs > 0 and task is None:
        raise ConfigError("PackConfig codebook_epochs > 0 needs data: pass task= (or set codebook_epochs=0)")
    if config.codebook_epochs > 0 and config.quantization != "kmeans":
        raise ConfigError("PackConfig codebook_epochs applies to quantization='kmeans' only")
    structure: dict[str, Any] = {}
    trace = None
    if config.budget is not None:
        from slimkit.prune.deep import budget_search

        new, structure, notes, trace = budget_search(model, config, task)
        layers = prunable_layers(new, config.selector, what="pack")
    elif config.prune is not None:
        from slimkit.prune.unstructured import prune_unstructured

        model = prune_unstructured(model, config.prune, task=task)
    if config.budget is None:
        new = copy_model(model)
        layers = prunable_layers(new, config.selector, what="pack")
        notes = []
    if config.budget is None and config.quantization != "none":
        bits = {n: config.conv_bits if isinstance(m, nn.modules.conv._ConvNd) else config.bits for n, m in layers}
        books = build_codebooks(new, layers, bits, config.quantization)
        if config.codebook_epochs > 0:
            books.write(new)
            new = finetune_codebooks(new, books, task, epochs=config.codebook_epochs, lr=config.lr, seed=config.seed)
        books.write(new)
        notes.append(f"{config.quantization} shared values: {config.bits}-bit Linear, {config.conv_bits}-bit Conv "
                     "codes; float16 codebooks")
    if config.dense_dtype == "float16":
        quantized = {f"{n}.weight" for n, _ in layers} if config.quantization != "none" else set()
        with torch.no_grad():
            for name, tensor in list(new.named_parameters()) + list(new.named_buffers()):
                if tensor.dtype == torch.float32 and name not in quantized:
                    tensor.copy_(_to_half_grid(tensor))
        notes.append("other tensors (biases, norms) stored as float16")
    record_stage(new, "pack", config, structure)
    new.slimkit_notes = list(getattr(model, "slimkit_notes", []) or []) + notes
    if trace is not None:
        new.slimkit_search = trace
    return new


def pack(model: nn.Module, path: str | Path, config: PackConfig | None = None, *, task: Task | None = None) -> dict[str, Any]:
    """Deep-Compression pipeline into one `.slim` file: returns {"model": the packed model (what
    `slimkit.load(path)` gives back), "bytes": {part: bytes}, "path": path, "search": the budget
    search's trace (`PackConfig.budget`; None without)}."""
    config = config or PackConfig()
    from slimkit.prune.packed import write_packed

    packed = quantize_values(model, config, task=task)
    sizes = write_packed(packed, path, index=config.index, level=config.level)
    return {"model": packed, "bytes": {k: v for k, v in sizes.items() if k != "path"}, "path": Path(path),
            "search": getattr(packed, "slimkit_search", None)}

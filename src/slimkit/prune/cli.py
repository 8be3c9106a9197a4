"""`slimkit prune` and `slimkit pack`: thin wrappers that build the same configs as the Python API."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import PATIENCE_HELP, TrustFactoryOpt, parse_patience


def _selector(include: Optional[list[str]], exclude: Optional[list[str]]):
    from slimkit.core.selector import Selector

    return Selector(include=include or ["*"], exclude=exclude or [])


def register(app: typer.Typer) -> None:
    @app.command()
    def prune(
        model: str = typer.Argument(..., help="zoo:NAME, a saved .safetensors/.slim model, or package.module:factory"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        weights: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory or zoo model"),
        trust_factory: bool = TrustFactoryOpt,
        structured: bool = typer.Option(False, "--structured", help="remove channels (smaller dense model) instead of weights"),
        sparsity: float = typer.Option(0.9, help="unstructured: fraction of weights set to zero, in [0, 1)"),
        scope: Optional[str] = typer.Option(None, help="unstructured: global | layer | sensitivity; structured: uniform | global"),
        pattern: str = typer.Option("unstructured", help="unstructured | N:M (e.g. 2:4)"),
        importance: Optional[str] = typer.Option(None, help="l1 | l2 | taylor (| bn_scale for --structured)"),
        schedule: str = typer.Option("oneshot", help="oneshot | iterative | gradual"),
        target_macs: float = typer.Option(0.5, help="structured: fraction of the MACs to keep"),
        epochs: int = typer.Option(5, help="fine-tuning epochs after pruning"),
        recovery: Optional[str] = typer.Option(None, help="finetune | distill | none"),
        patience: str = typer.Option("auto", help=PATIENCE_HELP),
        include: Optional[list[str]] = typer.Option(None, help="layer-name patterns to prune (default all)"),
        exclude: Optional[list[str]] = typer.Option(None, help="layer-name patterns to leave alone"),
        config: Optional[Path] = typer.Option(None, "--config", help="PruneConfig / StructuredPruneConfig as YAML/JSON (overrides the options)"),
        out: Path = typer.Option(Path("slimkit-out/pruned"), "--out", "-o",
                                 help="output path; unstructured writes OUT.slim (sparse), structured OUT.safetensors"),
    ) -> None:
        """Prune a model (unstructured, N:M or structured) and write it; prints accuracy and bytes."""
        from slimkit.cli.common import console, load_model, load_task
        from slimkit.core.artifact import save
        from slimkit.core.io import output_file
        from slimkit.core.trainer import accuracy
        from slimkit.prune import PruneConfig, StructuredPruneConfig, prune as run_prune, write_packed

        if config is not None:
            cls = StructuredPruneConfig if structured else PruneConfig
            cfg = cls.from_file(config)
        elif structured:
            cfg = StructuredPruneConfig(target_macs=target_macs, scope=scope or "uniform", importance=importance or "l2",
                                        recovery={"method": recovery or "distill", "epochs": epochs,
                                                  "patience": parse_patience(patience)},
                                        selector=_selector(include, exclude))
        else:
            cfg = PruneConfig(sparsity=sparsity, scope=scope or "global", pattern=pattern, importance=importance or "l1",
                              schedule=schedule, recovery={"method": recovery or "finetune", "epochs": epochs,
                                                           "patience": parse_patience(patience)},
                              selector=_selector(include, exclude))
        out = Path(out)
        if isinstance(cfg, StructuredPruneConfig):
            path = out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
        else:
            path = out if out.suffix == ".slim" else out.with_name(out.name + ".slim")
        output_file(path)  # before pruning and fine-tuning: an unwritable --out must not cost the run
        task = load_task(data)
        net = load_model(model, weights=weights, task=task, trust_factory=trust_factory)
        before = accuracy(net, task, "test")
        small = run_prune(net, cfg, task=task)
        after = accuracy(small, task, "test")
        if isinstance(cfg, StructuredPruneConfig):
            save(small, path)
        else:
            write_packed(small, path)
        for note in getattr(small, "slimkit_notes", []):
            console.print(f"note: {note}", markup=False, highlight=False)
        console.print(f"test accuracy {100 * before:.2f}% -> {100 * after:.2f}%  wrote {path} "
                      f"({path.stat().st_size:,} bytes)", markup=False, highlight=False)

    @app.command()
    def pack(
        model: str = typer.Argument(..., help="zoo:NAME, a saved .safetensors/.slim model, or package.module:factory"),
        data: str = typer.Option("digits", "--data", "-d", help="data for pruning fine-tune / codebook training"),
        weights: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory or zoo model"),
        trust_factory: bool = TrustFactoryOpt,
        sparsity: Optional[float] = typer.Option(None, help="prune to this unstructured sparsity first (global, fine-tuned)"),
        prune_epochs: int = typer.Option(5, help="fine-tuning epochs of that pruning"),
        quantization: str = typer.Option("kmeans", help="kmeans | linear | none"),
        bits: int = typer.Option(5, help="value bits of Linear layers"),
        conv_bits: int = typer.Option(8, help="value bits of Conv layers"),
        codebook_epochs: int = typer.Option(0, help="epochs of codebook fine-tuning (kmeans)"),
        budget: Optional[float] = typer.Option(None, help="accuracy budget in validation points: search per-layer "
                                               "sparsity and code bits (then --sparsity/--bits/--conv-bits are not used)"),
        index: str = typer.Option("auto", help="auto | dense | bitmask | relative"),
        dense_dtype: str = typer.Option("float32", help="storage of biases/norms: float32 | float16"),
        config: Optional[Path] = typer.Option(None, "--config", help="PackConfig as YAML/JSON (overrides the options)"),
        out: Path = typer.Option(Path("slimkit-out/model.slim"), "--out", "-o", help="the .slim file to write"),
    ) -> None:
        """Deep-Compression packing into a .slim file; prints the bytes of every part."""
        from slimkit.cli.common import console, load_model, load_task
        from slimkit.core.io import output_file
        from slimkit.core.trainer import accuracy
        from slimkit.errors import ConfigError
        from slimkit.prune import PackConfig, PruneConfig, pack as run_pack

        if out.suffix != ".slim":
            raise ConfigError(f"--out {out}: a packed model file must end in .slim")
        if config is not None:
            cfg = PackConfig.from_file(config)
        else:
            prune_cfg = PruneConfig(sparsity=sparsity, recovery={"epochs": prune_epochs}) if sparsity is not None else None
            if budget is not None and sparsity is not None:
                raise ConfigError("--budget searches the sparsity itself: drop --sparsity")
            cfg = PackConfig(quantization=quantization, bits=bits, conv_bits=conv_bits, codebook_epochs=codebook_epochs,
                             index=index, dense_dtype=dense_dtype, prune=prune_cfg, budget=budget)
        output_file(out)
        task = load_task(data)
        net = load_model(model, weights=weights, task=task, trust_factory=trust_factory)
        before = accuracy(net, task, "test")
        result = run_pack(net, out, cfg, task=task)
        after = accuracy(result["model"], task, "test")
        for note in getattr(result["model"], "slimkit_notes", []):
            console.print(f"note: {note}", markup=False, highlight=False)
        parts = ", ".join(f"{k} {v:,}" for k, v in result["bytes"].items() if k != "total")
        console.print(f"test accuracy {100 * before:.2f}% -> {100 * after:.2f}%  wrote {out} "
                      f"({result['bytes']['total']:,} bytes: {parts})", markup=False, highlight=False)

"""`slimkit factorize MODEL --data D`: low-rank factorization of a trained model, with recovery."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import PATIENCE_HELP, TrustFactoryOpt, parse_patience


def print_layer_table(title: str, layers: dict, skipped: dict, rank_key: str = "rank") -> None:
    """Per-layer table (replaced layers, then skipped layers with their reason)."""
    from rich.table import Table

    from slimkit.cli.common import console

    table = Table(title=title)
    for col in ("layer", "method", rank_key, "params before", "params after", "note"):
        table.add_column(col)
    for name, info in layers.items():
        note = f"energy kept {info['energy_kept']}" if "energy_kept" in info else (
            f"LS rel. error {info['relative_error']:.4f}" if "relative_error" in info else "")
        table.add_row(name, info.get("kind", info.get("block", "")), str(info.get(rank_key, "")),
                      f"{info['params_before']:,}", f"{info['params_after']:,}", note)
    for name, why in skipped.items():
        table.add_row(name, "skipped", "", "", "", why)
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("factorize")
    def factorize_command(
        model: str = typer.Argument(..., help="zoo:NAME, a saved .safetensors model, or package.module:factory"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        weights: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory or zoo model"),
        trust_factory: bool = TrustFactoryOpt,
        rank_selection: Optional[str] = typer.Option(None, "--rank-selection",
                                                     help="energy | ratio | vbmf | sensitivity | fixed"),
        energy: float = typer.Option(0.95, help="fraction of squared singular values kept (rank-selection energy)"),
        param_ratio: float = typer.Option(0.5, "--param-ratio", help="fraction of each layer's parameters kept (ratio)"),
        rank: Optional[int] = typer.Option(None, help="one rank for every layer (implies --rank-selection fixed)"),
        max_accuracy_drop: float = typer.Option(0.01, help="per-layer validation accuracy budget (sensitivity)"),
        conv_method: str = typer.Option("tucker2", "--conv-method", help="tucker2 | channel | spatial | none"),
        include: list[str] = typer.Option(["*"], "--include", help="layer name patterns to factorize (repeatable)"),
        exclude: list[str] = typer.Option([], "--exclude", help="layer name patterns to leave alone (repeatable)"),
        recovery: str = typer.Option("none", help="none | distill | finetune"),
        recovery_epochs: int = typer.Option(2, "--recovery-epochs", help="epochs of recovery training (at most)"),
        patience: str = typer.Option("auto", help=PATIENCE_HELP),
        config: Optional[Path] = typer.Option(None, "--config", help="LowRankConfig as YAML/JSON (replaces the options above)"),
        out: Path = typer.Option(Path("slimkit-out/factorized.safetensors"), "--out", "-o", help="where to save the model"),
    ) -> None:
        """Factorize Linear/Conv2d layers (SVD, Tucker-2, channel/spatial SVD); save and print before/after."""
        from slimkit.cli.common import console, load_model, load_task, print_accuracy_change
        from slimkit.core.artifact import save
        from slimkit.core.io import output_file
        from slimkit.evaluate import count_params
        from slimkit.lowrank import LowRankConfig, factorization_report, factorize

        if config is not None:
            cfg = LowRankConfig.from_file(config)
        else:
            selection = rank_selection or ("fixed" if rank is not None else "energy")
            cfg = LowRankConfig(rank_selection=selection, energy=energy, param_ratio=param_ratio, rank=rank,
                                max_accuracy_drop=max_accuracy_drop, conv_method=conv_method,
                                selector={"include": include, "exclude": exclude},
                                recovery={"method": recovery, "epochs": recovery_epochs,
                                          "patience": parse_patience(patience)})
        output_file(out)  # before the work: an unwritable --out must not cost the run
        task = load_task(data)
        net = load_model(model, weights=weights, task=task, trust_factory=trust_factory)
        small = factorize(net, cfg, task=task)
        structure = factorization_report(small)
        print_layer_table("factorized layers", structure["layers"], structure["skipped"])
        save(small, out)
        print_accuracy_change(net, small, task)
        console.print(f"params {count_params(net)['params']:,} -> {count_params(small)['params']:,}; saved {out} "
                      f"({out.stat().st_size:,} bytes)", markup=False, highlight=False)

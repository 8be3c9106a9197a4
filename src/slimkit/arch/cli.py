"""`slimkit separable MODEL --data D`: convert convolutions into MobileNet-style blocks, with KD recovery."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import PATIENCE_HELP, TrustFactoryOpt, parse_patience


def register(app: typer.Typer) -> None:
    @app.command("separable")
    def separable_command(
        model: str = typer.Argument(..., help="zoo:NAME, a saved .safetensors model, or package.module:factory"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        weights: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory or zoo model"),
        trust_factory: bool = TrustFactoryOpt,
        block: str = typer.Option("separable", help="separable (MobileNetV1) | inverted_residual (MobileNetV2)"),
        depth_multiplier: int = typer.Option(1, "--depth-multiplier", help="depthwise outputs per input channel"),
        expansion: int = typer.Option(2, help="hidden channels per input channel of an inverted residual block"),
        min_in_channels: int = typer.Option(4, "--min-in-channels", help="keep convolutions with fewer input channels"),
        init: str = typer.Option("least_squares", help="least_squares | svd"),
        include: list[str] = typer.Option(["*"], "--include", help="layer name patterns to convert (repeatable)"),
        exclude: list[str] = typer.Option([], "--exclude", help="layer name patterns to leave alone (repeatable)"),
        recovery: str = typer.Option("distill", help="distill | finetune | none"),
        recovery_epochs: int = typer.Option(2, "--recovery-epochs", help="epochs of recovery training (at most)"),
        patience: str = typer.Option("auto", help=PATIENCE_HELP),
        config: Optional[Path] = typer.Option(None, "--config", help="SeparableConfig as YAML/JSON (replaces the options above)"),
        out: Path = typer.Option(Path("slimkit-out/separable.safetensors"), "--out", "-o", help="where to save the model"),
    ) -> None:
        """Rewrite kxk convolutions as depthwise-separable / inverted-residual blocks; save and print before/after."""
        from slimkit.arch import SeparableConfig, conversion_report, separable
        from slimkit.cli.common import console, load_model, load_task, print_accuracy_change
        from slimkit.core.artifact import save
        from slimkit.core.io import output_file
        from slimkit.evaluate import count_macs, count_params
        from slimkit.lowrank.cli import print_layer_table

        if config is not None:
            cfg = SeparableConfig.from_file(config)
        else:
            cfg = SeparableConfig(block=block, depth_multiplier=depth_multiplier, expansion=expansion,
                                  min_in_channels=min_in_channels, init=init,
                                  selector={"include": include, "exclude": exclude},
                                  recovery={"method": recovery, "epochs": recovery_epochs,
                                            "patience": parse_patience(patience)})
        output_file(out)  # before the work: an unwritable --out must not cost the run
        task = load_task(data)
        net = load_model(model, weights=weights, task=task, trust_factory=trust_factory)
        mobile = separable(net, cfg, task=task)
        structure = conversion_report(mobile)
        print_layer_table("converted layers", structure["layers"], structure["skipped"], rank_key="width")
        save(mobile, out)
        print_accuracy_change(net, mobile, task)
        x = task.example_input(1)
        console.print(f"params {count_params(net)['params']:,} -> {count_params(mobile)['params']:,}; "
                      f"MACs {count_macs(net, x):,} -> {count_macs(mobile, x):,}; saved {out} ({out.stat().st_size:,} bytes)",
                      markup=False, highlight=False)

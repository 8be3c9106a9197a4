"""`slimkit search`: neural architecture search from the command line (thin wrapper over NASConfig)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import TrustFactoryOpt


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        space: str = typer.Option("mbconv", help="search space: mbconv | cell"),
        strategy: str = typer.Option("evolution", help="random | evolution | rl | gradient"),
        trials: int = typer.Option(20, help="trials to complete (over all workers)"),
        epochs: int = typer.Option(3, help="proxy training epochs per candidate"),
        max_macs: Optional[int] = typer.Option(None, help="hard limit on MACs (batch 1)"),
        max_params: Optional[int] = typer.Option(None, help="hard limit on parameters"),
        max_latency_ms: Optional[float] = typer.Option(None, help="hard limit on predicted latency (ms)"),
        max_macs_ratio: Optional[float] = typer.Option(None, help="limit MACs to this fraction of --reference's"),
        reference: Optional[str] = typer.Option(None, help="model the ratio refers to (zoo:NAME or a saved model)"),
        trust_factory: bool = TrustFactoryOpt,
        objective: str = typer.Option("macs", help="cost on the Pareto front: macs | params | latency"),
        runtime: str = typer.Option("torch", help="latency table runtime: torch | ort"),
        train_fraction: float = typer.Option(1.0, help="fraction of the training split for proxy training"),
        finalists: int = typer.Option(3, help="most accurate trials re-trained with more seeds before choosing (0: off)"),
        storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: journal file in --out)"),
        study: Optional[str] = typer.Option(None, help="study name (workers with the same name share it)"),
        workers: int = typer.Option(1, help="local worker processes"),
        seed: int = typer.Option(0, help="random seed"),
        config: Optional[Path] = typer.Option(None, "--config", help="NASConfig as YAML/JSON (replaces the options above)"),
        out: Path = typer.Option(Path("slimkit-out/nas"), "--out", "-o", help="output folder"),
    ) -> None:
        """Search an architecture under MACs/params/latency limits; resumes from --storage; exports the chosen."""
        from slimkit.cli.common import console, load_model, load_task
        from slimkit.core.io import output_dir
        from slimkit.search.nas import NASConfig, search

        if config is not None:
            cfg = NASConfig.from_file(config)
        else:
            cfg = NASConfig(space=space, strategy=strategy, trials=trials, epochs=epochs, max_macs=max_macs,
                            max_params=max_params, max_latency_ms=max_latency_ms, max_macs_ratio=max_macs_ratio,
                            objective=objective, runtime=runtime, train_fraction=train_fraction, finalists=finalists,
                            seed=seed)
        output_dir(out)
        task = load_task(data)
        ref = load_model(reference, task=task, trust_factory=trust_factory) if reference else None
        result = search(task, cfg, out_dir=out, storage=storage, study_name=study, workers=workers, reference=ref)
        b = result.best
        if b is None:
            import sys

            print(f"error: no trial completed (see {out})", file=sys.stderr)
            raise typer.Exit(2)
        console.print(f"chosen trial {b['trial']}: val accuracy {100 * b['val_accuracy']:.2f}%, {b['macs']:,} MACs, "
                      f"{b['param_count']:,} params; {len(result.pareto)} on the Pareto front")
        console.print(f"wrote {result.artifacts.get('model')} and {result.artifacts.get('report')}")
        if result.info.get("warning"):  # a script must not take a search that learned nothing for a success
            import sys

            print(f"error: {result.info['warning']} (report in {result.artifacts.get('report')})", file=sys.stderr)
            raise typer.Exit(2)

"""`slimkit compress` (run a recipe) and `slimkit auto` (the advisor)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import TrustFactoryOpt, console, load_model, load_task
from slimkit.core.io import output_dir


def parse_duration(text: str) -> float:
    """"600", "600s", "10m", "1.5h" -> seconds (a ConfigError names the bad value)."""
    from slimkit.errors import ConfigError

    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise ConfigError(f"--time-budget {text!r}: use seconds, or a number with s, m or h (e.g. 10m)") from None
    if not seconds > 0:
        raise ConfigError(f"--time-budget {text!r} must be positive")
    return seconds


def register(app: typer.Typer) -> None:
    @app.command()
    def compress(
        model: str = typer.Argument(..., help="zoo:NAME, a saved model, or package.module:factory"),
        recipe: Path = typer.Option(..., "--recipe", "-r", help="recipe YAML (see recipes/)"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        weights: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory/zoo model"),
        trust_factory: bool = TrustFactoryOpt,
        out: Path = typer.Option(Path("slimkit-out"), "--out", "-o", help="output folder (checkpoints, report)"),
        resume: bool = typer.Option(True, help="continue an interrupted run in --out"),
    ) -> None:
        """Run a recipe: stages, evaluation after each, checkpoints, report."""
        from slimkit.pipeline.recipe import load_recipe
        from slimkit.pipeline.runner import compress as run

        parsed = load_recipe(recipe)  # validate before touching data or the model
        output_dir(out)
        task = load_task(data)
        net = load_model(model, weights=weights, task=task, trust_factory=trust_factory)
        result = run(net, parsed, task, out, resume=resume, model_name=model)
        final = result["stages"][-1]["metrics"]
        base = result["stages"][0]["metrics"]
        if final.get("accuracy") is not None:
            console.print(f"accuracy {100 * base['accuracy']:.2f}% -> {100 * final['accuracy']:.2f}%")
        console.print(f"size {base['size_bytes']:,} -> {final['size_bytes']:,} bytes "
                      f"({base['size_bytes'] / final['size_bytes']:.1f}x smaller)")
        for c in result["sections"].get("constraints", []):
            console.print(f"constraint {c['name']}: {c['value']} (limit {c['limit']}) {'ok' if c['ok'] else 'NOT MET'}")
        console.print(f"wrote {out / 'report.html'}")

    @app.command()
    def auto(
        model: str = typer.Argument(..., help="zoo:NAME (trained first if no --weights), a saved model, or a factory"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR"),
        weights: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory/zoo model"),
        trust_factory: bool = TrustFactoryOpt,
        max_accuracy_drop: float = typer.Option(0.5, help="accuracy points you accept to lose"),
        max_size_kb: Optional[float] = typer.Option(None, help="largest deployable file, KiB"),
        max_latency_ms: Optional[float] = typer.Option(None, help="slowest acceptable latency, ms"),
        runtime: str = typer.Option("ort", help="ort | torch: where latency is measured"),
        batch_size: int = typer.Option(64, help="batch size of the latency objective"),
        trials: int = typer.Option(16, help="recipes the search evaluates"),
        time_budget: Optional[str] = typer.Option(None, "--time-budget", help="wall-clock budget of the whole run, "
                                                  "e.g. 600s, 10m, 1.5h; the search stops early to keep it"),
        screen_images: int = typer.Option(2000, help="training images the search trains on (the recommendation "
                                          "is rebuilt on all of them); 0: all"),
        seed: int = typer.Option(0, help="random seed"),
        out: Path = typer.Option(Path("slimkit-auto"), "--out", "-o", help="output folder"),
        storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage shared by several workers "
                                              "(journal:PATH or sqlite:///FILE.db); a rerun resumes the search"),
        study: str = typer.Option("auto", "--study", help="study name in --storage"),
        worker: bool = typer.Option(False, "--worker", help="only run trials of the --storage study (no "
                                    "recommendation or report; the run without --worker writes them)"),
    ) -> None:
        """Which technique? Sensitivity analysis + multi-objective recipe search -> recommended model, recipe, report."""
        from slimkit.errors import ConfigError
        from slimkit.pipeline.advisor import AutoConfig, advise, describe

        if worker and storage is None:
            raise ConfigError("--worker needs --storage (the study the workers share)")
        config = AutoConfig(max_accuracy_drop=max_accuracy_drop, max_size_kb=max_size_kb, max_latency_ms=max_latency_ms,
                            runtime=runtime, latency_batch_size=batch_size, trials=trials, seed=seed,
                            time_budget_s=parse_duration(time_budget) if time_budget else None,
                            screen_images=screen_images or None)
        output_dir(out)
        task = load_task(data)
        net = load_model(model, weights=weights, task=task, seed=seed, trust_factory=trust_factory,
                         untrained_note=False)  # trained first below
        if model.startswith("zoo:") and not weights:
            from slimkit.core.trainer import TrainConfig, fit
            from slimkit.pipeline.demo import DEMO_TRAIN

            console.print(f"{model} has no weights: training it first (30 epochs)")
            net = fit(net, task, TrainConfig(epochs=30, **{**DEMO_TRAIN, "seed": seed}), description="train").model
        result = advise(net, task, config, out, model_name=model, storage=storage, study=study, worker=worker)
        if worker:
            return
        base, final = result["stages"][0]["metrics"], result["stages"][-1]["metrics"]
        console.print(f"[bold]recommended[/bold]: {describe(result['sections']['recommendation']['params'])}")
        for reason in result["sections"]["recommendation"]["reasons"]:
            console.print(f"  - {reason}")
        console.print(f"test accuracy {100 * base['accuracy']:.2f}% -> {100 * final['accuracy']:.2f}%, "
                      f"{base['size_bytes']:,} -> {final['size_bytes']:,} bytes")
        for c in result["sections"].get("constraints", []):
            console.print(f"constraint {c['name']}: {c['value']:.3f} (limit {c['limit']}) {'ok' if c['ok'] else 'NOT MET'}")
        console.print(f"wrote {out / 'report.html'}, {out / 'recipe.yaml'}")

"""`slimkit compress` (run a recipe) and `slimkit auto` (the advisor)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import console, load_model, load_task


def register(app: typer.Typer) -> None:
    @app.command()
    def compress(
        model: str = typer.Argument(..., help="zoo:NAME, a saved model, or package.module:factory"),
        recipe: Path = typer.Option(..., "--recipe", "-r", help="recipe YAML (see recipes/)"),
        data: str = typer.Option("digits", "--data", "-d", help="digits | mnist:DIR | npz:FILE | imagefolder:DIR"),
        weights: Optional[str] = typer.Option(None, "--weights", help="safetensors weights for a factory/zoo model"),
        out: Path = typer.Option(Path("slimkit-out"), "--out", "-o", help="output folder (checkpoints, report)"),
        resume: bool = typer.Option(True, help="continue an interrupted run in --out"),
    ) -> None:
        """Run a recipe: stages, evaluation after each, checkpoints, report."""
        from slimkit.pipeline.recipe import load_recipe
        from slimkit.pipeline.runner import compress as run

        parsed = load_recipe(recipe)  # validate before touching data or the model
        task = load_task(data)
        net = load_model(model, weights=weights, task=task)
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

"""Stage runner, recipes, `compress`, the demo."""
from slimkit.pipeline.recipe import Recipe, load_recipe
from slimkit.pipeline.runner import compress
from slimkit.pipeline.stage import StageOutcome, evaluate_stage, run_stage

__all__ = ["StageOutcome", "run_stage", "evaluate_stage", "Recipe", "load_recipe", "compress"]

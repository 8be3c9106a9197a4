"""Stage runner, demo, recipes."""
from slimkit.pipeline.stage import StageOutcome, evaluate_stage, run_stage

__all__ = ["StageOutcome", "run_stage", "evaluate_stage"]

"""The technique contract, checked the same way for every technique on any model.

    outcome = check(model, config, task, directory)

applies `config`'s technique to `model` (as `slimkit.core.registry.apply` does) and asserts what every
technique promises, whatever it does:

- the input model is untouched (its tensors, its module structure and its recorded stages), and so is the
  config given;
- the stage is recorded on the result, and its recorded config, through JSON, is the config given;
- the result's output has the input model's output shape;
- the artifact the technique's result is measured by (`Technique.write_artifact`, else the safetensors
  file of `slimkit.save`) is written, and reloads with outputs `allclose` to the result's: `slimkit.load`
  for `.safetensors` / `.slim`, ONNX Runtime for `.onnx` (int8 kernels against slimkit's simulation,
  within a fraction of the output's spread); a `slimkit.save` round trip holds for every result too.

A technique that cannot handle the model must refuse with a typed `SlimkitError` (outcome "skip", with
its message as the reason) and leave the input untouched; anything else that goes wrong raises
`ContractViolation` (an AssertionError naming the technique and the broken promise). The registry
contract test (tests/test_contract.py) runs one table of (technique, model, config) rows through this,
and `benchmarks/coverage.py` runs it over torchvision, timm and transformers models; a plugin author can
check a new technique with it the same way.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimkit.errors import SlimkitError

# int8 kernels against the simulation: rounding of one activation step may differ, never more than this
# fraction of the output's standard deviation on average
ONNX_MEAN_DIFF_OF_STD = 0.1


def quick_configs() -> dict:
    """technique name -> a cheap config of it (no recovery training, small calibration, a two-trial search):
    what the contract test and benchmarks/coverage.py run, since the contract is about what a technique
    promises, not about accuracy."""
    import slimkit as sk
    from slimkit.lowrank import LowRankConfig
    from slimkit.prune import HeadPruneConfig, PackConfig, PruneConfig, StructuredPruneConfig
    from slimkit.quantize import Pt2eConfig, QuantConfig
    from slimkit.search import NASConfig

    tiny_space = {"widths": [0.5], "depths": [1], "kernels": [3], "expansions": [1], "se": [False]}
    return {
        "prune": PruneConfig(sparsity=0.5, recovery="none"),
        "prune_structured": StructuredPruneConfig(target_macs=0.7, recovery="none"),
        "prune_heads": HeadPruneConfig(heads=0.5, ffn=0.25),
        "pack": PackConfig(prune=PruneConfig(sparsity=0.5, recovery="none"), codebook_epochs=0),
        "factorize": LowRankConfig(energy=0.9),
        "separable": sk.arch.SeparableConfig(calibration_samples=32, only_if_smaller=False, recovery="none"),
        "distill": sk.distill.DistillConfig(epochs=1, cache_teacher=True, temperature=4, alpha=0.9),
        "quantize": QuantConfig(speed_check=False, calibration_samples=32),
        "quantize_pt2e": Pt2eConfig(calibration_samples=16),
        "nas": NASConfig(space_options=tiny_space, trials=2, epochs=1, max_steps=2, train_fraction=0.3, finalists=0),
    }


class ContractViolation(AssertionError):
    """A technique broke a promise of the contract (not a typed refusal: a defect)."""


@dataclass
class Outcome:
    technique: str
    status: str  # "ok" or "skip" (a typed refusal; `reason` holds its message)
    reason: str = ""
    error: str = ""  # the typed error's class name, for a skip
    seconds: float = 0.0  # the technique's apply, without writing or checking
    params_ratio: float | None = None
    macs_ratio: float | None = None
    artifact: str | None = None
    artifact_bytes: int | None = None
    reference_bytes: int | None = None  # the input model's slimkit.save file
    parity: dict[str, float] = field(default_factory=dict)  # ONNX artifacts: runtime vs simulation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _snapshot(model: nn.Module) -> tuple:
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
    return tensors, repr(model), copy.deepcopy(getattr(model, "slimkit_state", None))


def _untouched(before: tuple, model: nn.Module) -> str | None:
    tensors, structure, state = before
    now = {k: v.detach() for k, v in model.state_dict().items()}
    if now.keys() != tensors.keys():
        return f"its tensors changed: {sorted(set(now) ^ set(tensors))[:5]}"
    changed = [k for k in tensors if now[k].shape != tensors[k].shape or not torch.equal(now[k], tensors[k])]
    if changed:
        return f"tensor(s) {changed[:5]} changed"
    if repr(model) != structure:
        return "its module structure changed"
    if getattr(model, "slimkit_state", None) != state:
        return "its recorded stages changed"
    return None


def _outputs(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(*x) if isinstance(x, (tuple, list)) else model.eval()(x)
    return out.float()


def _violate(technique: str, what: str) -> ContractViolation:
    return ContractViolation(f"{technique}: {what}")


def check(model: nn.Module, config, task, directory: str | Path, *, atol: float = 1e-4,
          measure: bool = True) -> Outcome:
    """Apply `config`'s technique to `model` on `task` and check the contract (module docstring). Returns the
    outcome; raises `ContractViolation` when a promise is broken. `measure`: also count parameters and MACs
    of both models (the ratios in the outcome)."""
    from slimkit.core import registry
    from slimkit.core.artifact import load, save
    from slimkit.core.state import applied, get_state

    technique = registry.for_config(config)
    name = technique.name
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    x = task.example_input(4)
    reference = _outputs(model, x)
    before, given = _snapshot(model), config.to_json()
    t0 = time.perf_counter()
    try:
        new = registry.apply(model, config, task=task)
    except SlimkitError as err:
        if (broken := _untouched(before, model)) is not None:
            raise _violate(name, f"refused ({type(err).__name__}) but the input model was changed: {broken}") from err
        return Outcome(name, "skip", reason=str(err), error=type(err).__name__, seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if (broken := _untouched(before, model)) is not None:
        raise _violate(name, f"the input model was changed: {broken}")
    if config.to_json() != given:
        raise _violate(name, "the config given was changed")
    if new is model:
        raise _violate(name, "returned its input model instead of a new one")
    stages = applied(new)
    if not stages or stages[-1] != name:
        raise _violate(name, f"the stage is not recorded (recorded stages: {stages})")
    recorded = json.loads(json.dumps(get_state(new)["stages"][-1]["config"]))
    if type(config).from_dict(recorded) != config or type(config).from_json(config.to_json()) != config:
        raise _violate(name, f"the config does not round-trip through JSON: {recorded}")
    out = _outputs(new, x)
    if out.shape != reference.shape:
        raise _violate(name, f"output shape {tuple(out.shape)}, the input model's is {tuple(reference.shape)}")
    if not torch.isfinite(out).all():
        raise _violate(name, "the result's output is not finite")

    saved = save(new, directory / f"{name}.safetensors")
    if not torch.allclose(_outputs(load(saved), x), out, atol=atol, rtol=1e-4):
        raise _violate(name, "the slimkit.save file reloads with different outputs")
    artifact = Path(technique.write_artifact(new, directory / name, task)) if technique.write_artifact else saved
    if not artifact.is_file() or artifact.stat().st_size == 0:
        raise _violate(name, f"the artifact {artifact} was not written")
    parity: dict[str, float] = {}
    if artifact.suffix == ".onnx":
        from slimkit.export.runtimes import check_parity

        parity = check_parity(new, artifact, x)
        if not parity["mean_abs_diff"] <= ONNX_MEAN_DIFF_OF_STD * max(parity["output_std"], 1e-6):
            raise _violate(name, f"ONNX Runtime's outputs of {artifact.name} differ from the model's: {parity}")
    elif not torch.allclose(_outputs(load(artifact), x), out, atol=atol, rtol=1e-4):
        raise _violate(name, f"the artifact {artifact.name} reloads with different outputs")

    outcome = Outcome(name, "ok", seconds=seconds, artifact=str(artifact), artifact_bytes=artifact.stat().st_size,
                      reference_bytes=save(model, directory / "reference.safetensors").stat().st_size, parity=parity)
    if measure:
        from slimkit.evaluate.metrics import count_macs, count_params

        one = task.example_input(1)
        outcome.params_ratio = count_params(new)["params"] / max(count_params(model)["params"], 1)
        try:
            outcome.macs_ratio = count_macs(new, one) / max(count_macs(model, one), 1)
        except Exception:  # noqa: BLE001 - a compiled graph (PT2E) cannot be counted by torch's FlopCounterMode
            outcome.macs_ratio = None
    return outcome

"""What was done to a model: its architecture source and the stages applied to it.

Recorded on the module as the attribute `slimkit_state` (a plain dict, JSON-serializable), so
`slimkit.save` can write it into the manifest and `slimkit.load` can rebuild the architecture
from the original source plus every stage's `restore`, then load the weights.
"""
from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

import slimkit

ATTR = "slimkit_state"


def get_state(model: nn.Module) -> dict[str, Any]:
    state = getattr(model, ATTR, None)
    if state is None:
        state = {"source": None, "stages": []}
        object.__setattr__(model, ATTR, state)
    return state


def set_source(model: nn.Module, kind: str, ref: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Record where the architecture comes from: kind 'zoo' (ref = name) or 'factory' (ref = 'pkg.mod:fn')."""
    get_state(model)["source"] = {"kind": kind, "ref": ref, "kwargs": dict(kwargs or {})}
    return model


def applied(model: nn.Module) -> list[str]:
    """The techniques applied to `model`, in order."""
    return [s["technique"] for s in get_state(model)["stages"]]


def record_stage(model: nn.Module, technique: str, config: Any, structure: dict[str, Any] | None = None) -> nn.Module:
    """Append a stage record. `structure` holds what `restore` needs (JSON-serializable). Whether
    `technique` may follow the model's stages is checked before any work (`registry.chained`)."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    get_state(model)["stages"].append(
        {"technique": technique, "config": cfg, "structure": structure or {}, "version": slimkit.__version__}
    )
    return model


# What a technique says about its result, for reports: set on the model as attributes by the technique,
# written into the last stage record by `slimkit.save` (its "report" entry) and set again on load, so a
# reloaded model reports what the fresh one did. Every technique has notes and `simulated`; the keys of
# its own report sections (`Technique.sections`, e.g. prune's "sensitivity") are added when it registers.
REPORT_ATTRS = {"notes": "slimkit_notes", "simulated": "slimkit_simulated"}


def report_payload(model: nn.Module) -> dict[str, Any]:
    """The report entries `model` carries (notes, simulated, the registered techniques' section payloads)."""
    return {key: getattr(model, attr) for key, attr in REPORT_ATTRS.items() if getattr(model, attr, None) is not None}


def stages_with_report(model: nn.Module) -> list[dict[str, Any]]:
    """The model's stage records with its report payload in the last one (what a file stores)."""
    records = [dict(s) for s in get_state(model)["stages"]]
    payload = report_payload(model)
    if records and payload:
        records[-1]["report"] = payload
    return records


def apply_report(model: nn.Module, records: list[dict[str, Any]]) -> nn.Module:
    """Set the report attributes stored in the last stage record (a file written by `slimkit.save`)."""
    from slimkit.core.registry import load_all

    load_all()  # every technique's section keys are known
    if records:
        for key, value in (records[-1].get("report") or {}).items():
            if key in REPORT_ATTRS:
                object.__setattr__(model, REPORT_ATTRS[key], copy.deepcopy(value))
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """Deep copy with its state (techniques never mutate their input)."""
    new = copy.deepcopy(model)
    object.__setattr__(new, ATTR, copy.deepcopy(get_state(model)))
    return new


def stages(model: nn.Module) -> list[dict[str, Any]]:
    return list(get_state(model)["stages"])


def last_stage(model: nn.Module, technique: str) -> dict[str, Any] | None:
    """The most recent recorded stage of `technique` on `model`, or None."""
    return next((s for s in reversed(stages(model)) if s["technique"] == technique), None)

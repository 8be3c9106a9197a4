"""A technique added from outside slimkit (a plugin package) joins every part of slimkit without edits
outside that package: `slimkit list`, recipes, save/load with its report payload, the HTML report's
sections, and the advisor's search space."""
import textwrap

import pytest
import torch

import slimkit
from slimkit.core import registry, state
from slimkit.errors import ConfigError

PLUGIN = '''
"""Round every Linear weight to float16 precision (values only; the architecture is unchanged)."""
from typing import ClassVar

import torch
import torch.nn as nn

from slimkit.core import registry
from slimkit.core.config import Config
from slimkit.core.registry import Technique, chained
from slimkit.core.state import copy_model, record_stage


class HalfRoundConfig(Config):
    technique: ClassVar[str] = "half_round"
    include_bias: bool = False


@chained("half_round")
def half_round(model, config=None, *, task=None):
    config = config or HalfRoundConfig()
    new = copy_model(model)
    rounded = []
    with torch.no_grad():
        for name, module in new.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(module.weight.half().float())
                if config.include_bias and module.bias is not None:
                    module.bias.copy_(module.bias.half().float())
                rounded.append(name)
    record_stage(new, "half_round", config, {})
    new.slimkit_notes = list(getattr(model, "slimkit_notes", []) or []) + [f"half_round: {len(rounded)} layer(s)"]
    new.slimkit_rounding = {"layers": rounded}
    return new


def rounding_section(stage):
    return f"<h2>rounded layers of {stage['name']}: {', '.join(stage['rounding']['layers'])}</h2>"


registry.register(Technique(
    name="half_round", family="plugin", config_cls=HalfRoundConfig, apply=half_round, order=60,
    summary="round Linear weights to float16 precision (a plugin)", sections={"rounding": rounding_section},
    candidates=lambda auto: {"weights": {}, "all": {"include_bias": True}},
    describe=lambda label: f"round Linear {label} to float16"))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin module on sys.path and named in SLIMKIT_PLUGINS, with a fresh registry load; slimkit's
    registry is as before afterwards."""
    registry.load_all()  # slimkit's own techniques, into the registry restored afterwards
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "slimkit_half_round_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SLIMKIT_PLUGINS", "slimkit_half_round_plugin")
    monkeypatch.setattr(registry, "_LOADED", False)
    registry.load_all()
    yield registry.get("half_round")
    state.REPORT_ATTRS.pop("rounding", None)
    import sys

    sys.modules.pop("slimkit_half_round_plugin", None)


def test_a_plugin_technique_is_listed_runs_in_recipes_saves_and_reports(plugin, tmp_path, trained_mlp, digits_task,
                                                                        capsys):
    from slimkit.cli.main import main
    from slimkit.pipeline.recipe import Recipe
    from slimkit.report import write_html

    assert main(["list"]) == 0
    assert "half_round" in capsys.readouterr().out
    recipe = Recipe.from_dict({"name": "plugin", "evaluation": {"runtimes": ["torch"], "batch_sizes": [1]},
                               "stages": [{"technique": "half_round", "config": {"include_bias": True}}]})
    result = slimkit.compress(trained_mlp, recipe, digits_task, tmp_path / "run")
    entry = result["stages"][1]
    assert entry["technique"] == "half_round" and entry["rounding"]["layers"] == ["1", "3", "5"]
    assert "half_round: 3 layer(s)" in entry["notes"]
    html = write_html(result, tmp_path / "report.html").read_text()
    assert "rounded layers of 01-half_round: 1, 3, 5" in html
    # the payload survives save / load like every built-in technique's
    rounded = slimkit.apply(trained_mlp, plugin.config_cls(), task=digits_task)
    path = slimkit.save(rounded, tmp_path / "rounded.safetensors")
    again = slimkit.load(path)
    assert again.slimkit_rounding == {"layers": ["1", "3", "5"]}
    x = digits_task.example_input(4)
    assert torch.allclose(again(x), rounded.eval()(x), atol=1e-6)
    assert again[1].weight.dtype == torch.float32 and torch.equal(again[1].weight, again[1].weight.half().float())


def test_a_plugin_technique_joins_the_advisors_space(plugin):
    from slimkit.pipeline.advisor_space import AutoConfig, build_stages, describe_params, technique_space

    dims, formats = technique_space(AutoConfig())
    assert dims["half_round"] == {"weights": {}, "all": {"include_bias": True}}
    assert "quantize:int8" in formats  # the built-in space is still there
    params = {"student": "none", "half_round": "all", "prune_structured": "none", "format": "quantize:int8"}
    stages = build_stages(params, AutoConfig())
    assert [s.technique for s in stages] == ["half_round", "quantize"]
    assert stages[0].technique_config().include_bias is True
    assert describe_params(params) == ("round Linear all to float16, then "
                                       "int8 static quantization (ONNX QDQ, per-channel)")


def test_a_plugin_that_cannot_be_imported_is_a_clear_error(monkeypatch):
    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setenv("SLIMKIT_PLUGINS", "no_such_slimkit_plugin")
    with pytest.raises(ConfigError, match="plugin 'no_such_slimkit_plugin'.*cannot be imported"):
        registry.techniques()
    monkeypatch.delenv("SLIMKIT_PLUGINS")
    assert registry.get("prune").name == "prune"  # the next load succeeds

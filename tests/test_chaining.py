"""The technique contract: every pair of techniques either composes — the chained model saves, reloads and
gives the same outputs — or the second one refuses at apply time with a typed `ChainError`, before any work.
Techniques left out here: prune_heads (attention heads: transformers only, see test_prune_heads.py) and nas
(it searches a new network rather than transforming this one; test_search_nas.py)."""
import dataclasses

import pytest
import torch

import slimkit as sk
from slimkit.core import registry
from slimkit.errors import ArtifactError, ChainError, SelectorError
from slimkit.lowrank import LowRankConfig
from slimkit.prune import PackConfig, PruneConfig, StructuredPruneConfig
from slimkit.quantize import QuantConfig

# cheap configs: no recovery training (the contract is about structure, not accuracy)
CONFIGS = {
    "prune": lambda: PruneConfig(sparsity=0.5, recovery="none"),
    "prune_structured": lambda: StructuredPruneConfig(target_macs=0.7, recovery="none"),
    "pack": lambda: PackConfig(prune=PruneConfig(sparsity=0.5, recovery="none"), codebook_epochs=0),
    "factorize": lambda: LowRankConfig(energy=0.9),
    "separable": lambda: sk.arch.SeparableConfig(calibration_samples=64, only_if_smaller=False),
    "distill": lambda: sk.distill.DistillConfig(epochs=1, cache_teacher=True),
    "quantize": lambda: QuantConfig(speed_check=False, calibration_samples=64),
    "quantize_pt2e": lambda: sk.quantize.Pt2eConfig(calibration_samples=32),
}


def test_every_registered_technique_is_covered_or_named_as_left_out():
    assert {t.name for t in registry.techniques()} == set(CONFIGS) | {"prune_heads", "nas"}


@pytest.fixture(scope="module")
def firsts(trained_lenet5, digits_task):
    return {name: registry.apply(trained_lenet5, make(), task=digits_task) for name, make in CONFIGS.items()}


@pytest.mark.parametrize("first", list(CONFIGS))
def test_each_pair_composes_or_refuses_before_any_work(first, firsts, digits_task, tmp_path, monkeypatch):
    model = firsts[first]
    x = digits_task.example_input(8)
    for second in CONFIGS:
        allowed = registry.get(first).next is None or second in registry.get(first).next
        if not allowed:
            calls = []
            spy = dataclasses.replace(registry.get(second), apply=lambda *a, **k: calls.append(1))
            with monkeypatch.context() as m:
                m.setitem(registry._REGISTRY, second, spy)
                with pytest.raises(ChainError, match=f"{second} cannot follow {first}"):
                    registry.apply(model, CONFIGS[second](), task=digits_task)
            assert not calls  # refused before the technique ran
            with pytest.raises(ChainError):  # and by the technique's own entry point
                registry.get(second).apply(model, CONFIGS[second](), task=digits_task)
            continue
        chained = registry.apply(model, CONFIGS[second](), task=digits_task)
        before, after = (sk.core.state.applied(m) for m in (model, chained))
        assert after[:len(before)] == before and after[-1] == second  # (pack records its prune step too)
        path = sk.save(chained, tmp_path / f"{first}-{second}.safetensors")
        with torch.no_grad():
            assert torch.allclose(sk.load(path)(x), chained(x), atol=1e-4), (first, second)


def test_quantize_then_factorize_is_a_typed_error_on_every_entry_point(firsts, digits_task, tmp_path):
    q = firsts["quantize"]
    with pytest.raises(ChainError, match="factorize cannot follow quantize.*apply factorize before quantize"):
        sk.factorize(q, LowRankConfig(energy=0.9))
    from slimkit.pipeline.stage import run_stage

    with pytest.raises(ChainError):
        run_stage(q, LowRankConfig(energy=0.9), digits_task, tmp_path)
    # a file whose manifest records the forbidden order does not load
    path = sk.save(q, tmp_path / "q.safetensors")
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        manifest = json.loads(fh.metadata()["slimkit"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    manifest["stages"].append({"technique": "factorize", "config": {}, "structure": {}})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"slimkit": json.dumps(manifest)})
    with pytest.raises(ArtifactError, match="factorize cannot follow quantize"):
        sk.load(tmp_path / "bad.safetensors")


def test_layers_inside_a_quantized_wrapper_are_never_selected(firsts, digits_task):
    from slimkit.core.selector import select

    q = firsts["quantize"]
    inner = [n for n, m in q.named_modules() if n.endswith(".layer") and isinstance(m, torch.nn.Linear)]
    assert inner  # the float originals are there ...
    with pytest.raises(SelectorError, match="matched no layer"):  # ... and never selected
        select(q, default_types=(torch.nn.Linear, torch.nn.Conv2d))
    float_head = sk.quantize(firsts["prune"], QuantConfig(speed_check=False, calibration_samples=64,
                                                          keep_float=["classifier.5"]), task=digits_task)
    assert [n for n, _ in select(float_head, default_types=(torch.nn.Linear,))] == ["classifier.5"]

"""Unstructured / N:M pruning: global threshold, per-layer maps, schedules, finalize, errors."""
import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.selector import Selector
from slimkit.core.state import set_source
from slimkit.core.trainer import accuracy
from slimkit.errors import ConfigError, SelectorError
from slimkit.prune import PruneConfig, allocate_sparsity, check_nm, sensitivity_analysis


def _two_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(5)  # the second layer has larger weights: a global threshold spares it
    return set_source(model, "factory", "torch.nn:Identity")


def test_global_threshold_prunes_smallest_across_layers():
    model = _two_layer()
    pruned = sk.prune(model, PruneConfig(sparsity=0.5, recovery="none"))
    ws = [model[0].weight, model[2].weight]
    ps = [pruned[0].weight, pruned[2].weight]
    total = sum(w.numel() for w in ws)
    zeros = sum(int((p == 0).sum()) for p in ps)
    assert zeros == round(0.5 * total)
    kept = torch.cat([w[p != 0].abs() for w, p in zip(ws, ps)])
    removed = torch.cat([w[p == 0].abs() for w, p in zip(ws, ps)])
    assert removed.max() <= kept.min()  # one threshold across both layers
    # the layer with larger weights keeps more than half, the other loses more than half
    assert (ps[1] == 0).float().mean() < 0.5 < (ps[0] == 0).float().mean()
    # kept weights are untouched; the input model is not modified
    assert torch.equal(pruned[0].weight[pruned[0].weight != 0], model[0].weight[pruned[0].weight != 0])
    assert int((model[0].weight == 0).sum()) == 0


def test_layer_scope_and_per_layer_map():
    model = _two_layer()
    pruned = sk.prune(model, PruneConfig(sparsity=0.5, scope="layer", layer_sparsity={"2": 0.25}, recovery="none"))
    assert (pruned[0].weight == 0).sum() == 64  # 0.5 of 128
    assert (pruned[2].weight == 0).sum() == 16  # 0.25 of 64
    structure = pruned.slimkit_state["stages"][-1]["structure"]
    assert structure["layers"] == {"0": 0.5, "2": 0.25}


def test_masks_gone_after_finalize_and_zeros_survive_finetune(trained_mlp, digits_task):
    pruned = sk.prune(trained_mlp, PruneConfig(sparsity=0.9, recovery={"epochs": 2}), task=digits_task)
    state = pruned.state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    for m in pruned.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert all(type(w) is nn.Parameter for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=1e-3)
    # 90% sparse LeNet-300-100 recovers to within 3 points after 2 epochs of fine-tuning
    assert accuracy(pruned, digits_task, "test") >= accuracy(trained_mlp, digits_task, "test") - 0.03


def test_pruned_model_save_load_round_trip(tmp_path, trained_lenet5, digits_task):
    pruned = sk.prune(trained_lenet5, PruneConfig(sparsity=0.8, recovery="none"))
    path = sk.save(pruned, tmp_path / "p.safetensors")
    again = sk.load(path)
    x = digits_task.example_input(16)
    assert torch.allclose(again(x), pruned(x), atol=1e-6)
    assert torch.equal(again.classifier[1].weight == 0, pruned.classifier[1].weight == 0)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:8", 1, 8)])
def test_nm_sparsity_exact_per_group(trained_lenet5, pattern, n, m):
    pruned = sk.prune(trained_lenet5, PruneConfig(pattern=pattern, recovery="none"))
    for name, module in pruned.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            rows = module.weight.reshape(module.weight.shape[0], -1)
            if rows.shape[1] % m:  # e.g. conv1's fan-in is 25: kept dense, and said so
                assert any("kept dense" in note and name in note for note in pruned.slimkit_notes)
                continue
            zeros = (rows.reshape(-1, m) == 0).sum(1)
            assert bool((zeros == m - n).all()), name  # exactly M-N zeros in every group
            assert check_nm(module.weight, n, m)
    assert (pruned.classifier[1].weight == 0).float().mean() == 1 - n / m
    assert not check_nm(trained_lenet5.classifier[1].weight, 2, 4)


def test_taylor_importance_differs_from_magnitude(trained_mlp, digits_task):
    mag = sk.prune(trained_mlp, PruneConfig(sparsity=0.7, recovery="none"))
    tay = sk.prune(trained_mlp, PruneConfig(sparsity=0.7, importance="taylor", recovery="none", taylor_batches=2),
                   task=digits_task)
    w_mag, w_tay = mag[1].weight != 0, tay[1].weight != 0
    assert not torch.equal(w_mag, w_tay)
    assert accuracy(tay, digits_task, "val") > 0.5


@pytest.mark.parametrize("schedule", ["iterative", "gradual"])
def test_schedules_reach_target(trained_mlp, digits_task, schedule):
    pruned = sk.prune(trained_mlp, PruneConfig(sparsity=0.8, schedule=schedule, steps=2, recovery={"epochs": 2}),
                      task=digits_task)
    stage = pruned.slimkit_state["stages"][-1]
    assert stage["structure"]["sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert accuracy(pruned, digits_task, "test") > 0.85


def test_sensitivity_allocation_meets_target():
    analysis = {"baseline": 0.9, "sizes": {"a": 1000, "b": 100},
                "curves": {"a": [[0.5, 0.9], [0.9, 0.9], [0.98, 0.89]], "b": [[0.5, 0.85], [0.9, 0.5], [0.98, 0.1]]}}
    alloc = allocate_sparsity(analysis, 0.8)
    overall = (1000 * alloc["a"] + 100 * alloc["b"]) / 1100
    assert overall == pytest.approx(0.8)
    assert alloc["a"] > alloc["b"]  # the robust, big layer takes the pruning


def test_sensitivity_analysis_and_scope(trained_mlp, digits_task):
    analysis = sensitivity_analysis(trained_mlp, digits_task, grid=[0.5, 0.95])
    assert set(analysis["curves"]) == {"1", "3", "5"}
    assert all(len(c) == 2 for c in analysis["curves"].values())
    assert analysis["curves"]["5"][1][1] <= analysis["baseline"]
    pruned = sk.prune(trained_mlp, PruneConfig(sparsity=0.8, scope="sensitivity", sensitivity_grid=[0.5, 0.8, 0.95],
                                               recovery="none"), task=digits_task)
    stage = pruned.slimkit_state["stages"][-1]
    assert stage["structure"]["sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert set(pruned.slimkit_sensitivity["curves"]) == {"1", "3", "5"}
    assert any(n.startswith("sensitivity-chosen") for n in pruned.slimkit_notes)


@pytest.mark.parametrize("kwargs,culprit", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
    ({"layer_sparsity": {"classifier.1": 1.5}}, "classifier.1"), ({"pattern": "5:4"}, "5:4"),
])
def test_bad_config_raises_config_error(kwargs, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        PruneConfig(**kwargs)


def test_selector_errors_name_the_layer(trained_lenet5):
    with pytest.raises(SelectorError, match="matched no layer"):
        sk.prune(trained_lenet5, PruneConfig(selector=Selector(include=["nothing.*"]), recovery="none"))
    with pytest.raises(SelectorError, match="fc9"):
        sk.prune(trained_lenet5, PruneConfig(selector=Selector(include=["fc9"]), recovery="none"))
    with pytest.raises(SelectorError, match="nomatch"):
        sk.prune(trained_lenet5, PruneConfig(scope="layer", layer_sparsity={"nomatch*": 0.5}, recovery="none"))


def test_data_needed_is_a_config_error(trained_lenet5):
    with pytest.raises(ConfigError, match="taylor"):
        sk.prune(trained_lenet5, PruneConfig(importance="taylor", recovery="none"))
    with pytest.raises(ConfigError, match="task"):
        sk.prune(trained_lenet5, PruneConfig(recovery={"epochs": 1}))


def test_auto_patience_resolution(digits_task):
    from dataclasses import replace

    from slimkit.core.trainer import auto_patience

    assert auto_patience("auto", 5, digits_task) == 5 and auto_patience("auto", 30, digits_task) == 10
    assert auto_patience("auto", 30, replace(digits_task, val=None)) is None  # nothing to stop on
    assert auto_patience(3, 30, digits_task) == 3 and auto_patience(None, 30, digits_task) is None
    with pytest.raises(ConfigError, match="patience"):
        PruneConfig(recovery={"patience": 0})


@pytest.mark.parametrize("recovery", ["finetune", "distill"])
def test_prune_recovery_stops_early_and_says_so(trained_mlp, digits_task, recovery):
    # lr 1e-12: no epoch improves on the first, so patience 1 stops after the second (a tie does not reset it)
    cfg = dict(method=recovery, epochs=6, lr=1e-12)
    stopped = sk.prune(trained_mlp, PruneConfig(sparsity=0.5, recovery={**cfg, "patience": 1}), task=digits_task)
    assert stopped.slimkit_recovery["ran"] == 2 and stopped.slimkit_recovery["best_epoch"] == 2
    assert any("stopped after 2 of 6 epochs" in n for n in stopped.slimkit_notes)
    full = sk.prune(trained_mlp, PruneConfig(sparsity=0.5, recovery={**cfg, "patience": None}), task=digits_task)
    assert full.slimkit_recovery["ran"] == 6 and not any("recovery" in n for n in full.slimkit_notes)
    assert stopped.slimkit_state["stages"][-1]["config"]["recovery"]["patience"] == 1  # recorded: reloading rebuilds it
    # the next stage's copy carries no stale record: a stage without recovery notes nothing
    again = sk.prune(stopped, PruneConfig(sparsity=0.6, recovery="none"), task=digits_task)
    assert not any("recovery" in n for n in again.slimkit_notes[len(stopped.slimkit_notes):])


def test_gradual_schedule_ignores_patience(trained_mlp, digits_task):
    pruned = sk.prune(trained_mlp, PruneConfig(sparsity=0.5, schedule="gradual",
                                               recovery={"epochs": 3, "lr": 1e-12, "patience": 1}), task=digits_task)
    assert pruned.slimkit_recovery["ran"] == 3  # an earlier epoch would be a less sparse model

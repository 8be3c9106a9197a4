"""NAS spaces: every candidate builds, saves and reloads; bad spaces raise typed errors."""
import json

import pytest
import torch

import slimkit
from slimkit.errors import ConfigError, InfeasibleError, ModelError
from slimkit.search.cost import Constraints, CostModel, LatencyTable, load_table
from slimkit.search.space import CellSpace, MBConvSpace, build, make_space, mobilenetv2_small_choices



@pytest.fixture(autouse=True)
def one_thread():
    """NAS tests run tiny ops: one thread is faster than two on a loaded 2-core machine."""
    from slimkit.evaluate.latency import torch_threads

    with torch_threads(1):
        yield

def _random_choices(space, seed):
    gen = torch.Generator().manual_seed(seed)
    return {d.name: d.choices[int(torch.randint(len(d.choices), (1,), generator=gen))] for d in space.decisions()}


@pytest.mark.parametrize("kind", ["mbconv", "cell"])
def test_candidates_build_save_and_reload(kind, tmp_path):
    space = make_space(kind, input_size=12)
    for seed in range(2):
        spec = space.spec(_random_choices(space, seed))
        spec = json.loads(json.dumps(spec))  # the spec is plain JSON
        model = build(spec).eval()
        x = torch.randn(2, 1, 12, 12)
        path = slimkit.save(model, tmp_path / f"{kind}{seed}.safetensors")
        again = slimkit.load(path)
        assert torch.allclose(model(x), again(x), atol=1e-6)
        assert again.spec == spec


def test_default_space_contains_the_zoo_mobilenet(digits_task):
    from slimkit import zoo
    from slimkit.evaluate import count_macs, count_params

    space = MBConvSpace.for_task(digits_task)
    net = build(space.spec(mobilenetv2_small_choices(space)))
    ref = zoo.for_task("mobilenetv2_small", digits_task)
    x = digits_task.example_input(1)
    assert count_macs(net, x) == count_macs(ref, x)
    assert count_params(net) == count_params(ref)


def test_empty_and_contradictory_spaces_raise_config_errors():
    with pytest.raises(ConfigError, match="'kernels' is empty"):
        MBConvSpace(kernels=[])
    with pytest.raises(ConfigError, match="'ops' is empty"):
        CellSpace(ops=[])
    with pytest.raises(ConfigError, match="odd"):
        MBConvSpace(kernels=[3, 4])
    with pytest.raises(ConfigError, match="input_size is 2"):
        MBConvSpace(input_size=2)  # two stride-2 stages cannot fit a 2-pixel input
    with pytest.raises(ConfigError, match="one stride per stage"):
        MBConvSpace(stage_channels=[16, 32], stage_strides=[1])
    with pytest.raises(ConfigError, match="unknown search space"):
        make_space("transformer")
    with pytest.raises(ConfigError, match="s0.kernel"):
        MBConvSpace().spec({**MBConvSpace().cheapest(), "s0.kernel": 9})
    with pytest.raises(ModelError, match="space"):
        build({"layers": 3})


def test_cost_model_exact_counts_and_infeasible_budget():
    space = MBConvSpace(input_size=12)
    cost = CostModel(Constraints(max_macs=1000))
    cheapest = cost.costs(space.spec(space.cheapest()))
    assert cheapest["macs"] > 1000
    with pytest.raises(InfeasibleError, match=r"max_macs=1,000 \(the cheapest candidate needs"):
        cost.check_space(space)
    ok = CostModel(Constraints(max_macs=cheapest["macs"], max_params=cheapest["params"]))
    assert ok.check_space(space) == cheapest
    assert ok.violations(space.spec(mobilenetv2_small_choices(MBConvSpace(input_size=12))))


def test_latency_table_sums_units_and_round_trips(tmp_path):
    space = CellSpace(input_size=8, widths=[0.5])
    table = LatencyTable("torch", threads=1, batch_size=1, runs=3)
    model = build(space.spec(space.cheapest()))
    predicted = table.predict(model)
    assert len(table.entries) == len(set(model.unit_keys))  # repeated units are measured once
    assert predicted == pytest.approx(sum(table.entries[k] for k in model.unit_keys))
    table.scale = 1.25
    path = table.save(tmp_path / "table.json")
    again = load_table(path)
    assert again.predict(model) == pytest.approx(1.25 * predicted)
    assert (again.runtime, again.threads, again.batch_size, again.statistic) == ("torch", 1, 1, "p10_ms")
    assert again.measured == 0  # nothing re-measured: every unit came from the file
    with pytest.raises(ConfigError, match="unknown latency runtime"):
        LatencyTable("tflite")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a slimkit latency table"):
        load_table(tmp_path / "bad.json")


def test_latency_rounds_time_units_and_models_in_one_interleaved_comparison(monkeypatch):
    import slimkit.search.cost as cost
    from slimkit.search.cost import check_table

    calls = []

    def fake_compare(variants, *, rounds, **kw):  # a machine where everything takes 2 ms per run
        calls.append((sorted(map(str, variants)), rounds))
        return {k: {"p10_ms": 2.0, "median_ms": 2.5} for k in variants}

    monkeypatch.setattr(cost, "compare_latency", fake_compare)
    space = CellSpace(input_size=8, widths=[0.5])
    model = build(space.spec(space.cheapest()))
    table = LatencyTable("torch", runs=6)
    table.entries = {model.unit_keys[0]: 1.0}  # measured before, faster than today
    row = check_table(table, [model], rounds=3)[0]
    (names, rounds), = calls  # one comparison: every unit (the known one too, rounds > 1) and the model
    assert rounds == 3 and len(names) == len(set(model.unit_keys)) + 1
    assert row["measured_ms"] == 2.0  # the table's statistic
    assert table.entries[model.unit_keys[0]] == 1.0  # the smaller figure is kept
    assert all(table.entries[k] == 2.0 for k in set(model.unit_keys) - {model.unit_keys[0]})
    calls.clear()
    check_table(table, [model], rounds=1)  # one round: known units are not timed again
    assert len(calls[0][0]) == 1
    with pytest.raises(ConfigError, match="rounds"):
        table.measure_rounds([model], 0)


def test_onnx_runtime_latency_table(tmp_path):
    pytest.importorskip("onnxruntime")
    space = CellSpace(input_size=8, widths=[0.5], stage_channels=[8, 16])
    table = LatencyTable("ort", threads=1, batch_size=2, runs=3)
    model = build(space.spec(space.cheapest()))
    assert table.predict(model) > 0
    assert table.measure_end_to_end(model) > 0
    assert table.to_dict()["versions"]["onnxruntime"]

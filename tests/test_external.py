"""torchvision:NAME and timm:NAME model references (slimkit.zoo.external)."""
from importlib.util import find_spec

import pytest
import torch

import slimkit as sk
from slimkit.errors import ArtifactError, ModelError

# found, not imported: slimkit.core makes torchvision importable beside the CPU torch (core/compat.py)
pytestmark = pytest.mark.skipif(find_spec("torchvision") is None or find_spec("timm") is None,
                                reason="the `models` extra (torchvision, timm) is not installed")


@pytest.mark.parametrize("ref", ["torchvision:mobilenet_v3_small", "timm:test_vit", "timm:test_efficientnet"])
def test_external_models_build_save_and_reload_without_a_factory(tmp_path, ref):
    model = sk.zoo.external(ref, num_classes=7).eval()
    kind, name = ref.split(":")
    assert model.slimkit_state["source"] == {"kind": kind, "ref": name, "kwargs": {"num_classes": 7}}
    path = sk.save(model, tmp_path / "m.safetensors")
    loaded = sk.load(path)  # no trust_factory: the library's own registry of names is trusted
    x = torch.randn(2, 3, 64, 64) if kind == "torchvision" else torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.allclose(loaded(x), out, atol=1e-6)


def test_external_model_dynamic_int8_and_onnx(tmp_path):
    model = sk.zoo.external("timm:test_vit", num_classes=5).eval()
    q = sk.quantize(model, sk.QuantConfig(weights="int8", activations="uint8", mode="dynamic", speed_check=False))
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert out.shape == ref.shape
    assert sk.sqnr_db(ref, out) > 20
    onnx = sk.export(q, tmp_path / "q.onnx", example_input=x[:1])
    assert onnx.stat().st_size > 0


def test_external_reference_errors(tmp_path):
    with pytest.raises(ModelError, match="similar: .*resnet18"):
        sk.zoo.external("torchvision:resnet1")
    with pytest.raises(ModelError, match="torchvision:NAME, timm:NAME or hf:TYPE_OR_DIR"):
        sk.zoo.external("keras:resnet18")
    with pytest.raises(ModelError, match="would fetch or read weights"):
        sk.zoo.external("torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(ModelError, match="pretrained"):
        sk.zoo.external("timm:test_vit", pretrained=True)
    # a file naming a model no library knows, or a non-string name, is refused with a typed error
    from slimkit.core.artifact import build_source

    with pytest.raises(ModelError, match="no model"):
        build_source({"kind": "timm", "ref": "os.system", "kwargs": {}})
    with pytest.raises(ArtifactError, match="must be a string"):
        build_source({"kind": "torchvision", "ref": ["resnet18"], "kwargs": {}})


def test_cli_takes_external_references(tmp_path, capsys):
    from slimkit.cli.main import main

    out = tmp_path / "m.onnx"  # timm models are shaped for the data (digits: 1 channel, 10 classes)
    assert main(["export", "timm:test_efficientnet", str(out)]) == 0
    assert out.stat().st_size > 0
    assert "random initialization" in capsys.readouterr().out
    assert main(["export", "torchvision:not_a_model", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "torchvision has no model 'not_a_model'" in err and "Traceback" not in err
    # torchvision constructors take no channel count: a 3-channel model on 1-channel data is a clear error
    assert main(["export", "torchvision:mobilenet_v3_small", str(tmp_path / "y.onnx")]) == 2
    err = capsys.readouterr().err
    assert "cannot run on data set 'digits'" in err and "Traceback" not in err


TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                 max_position_embeddings=64)


@pytest.mark.parametrize("ref, head, fields", [
    ("hf:bert", "classifier", {**TINY_BERT, "num_labels": 3}),
    ("hf:gpt2", "causal-lm", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)),
    ("hf:llama", "causal-lm", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)),
])
def test_hf_configs_build_save_and_reload(tmp_path, ref, head, fields):
    model = sk.zoo.external(ref, head=head, **fields)
    assert model.slimkit_state["source"]["kind"] == "hf" and model.slimkit_state["source"]["kwargs"]["head"] == head
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(ids, mask)
    width = 3 if head == "classifier" else 100
    assert out.shape == ((2, width) if head == "classifier" else (2, 12, width))
    loaded = sk.load(sk.save(model, tmp_path / "m.safetensors"))  # rebuilt from the recorded config fields
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), out, atol=1e-5)


def test_hf_from_a_local_config_directory_and_errors(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slimkit.core.artifact import build_source

    transformers.BertConfig(**TINY_BERT).save_pretrained(tmp_path / "cfg")  # config.json only, no weights
    model = sk.zoo.external(f"hf:{tmp_path / 'cfg'}")
    assert model.slimkit_state["source"]["ref"] == "bert"
    assert model.model.config.hidden_size == 32 and model(torch.randint(0, 100, (1, 5))).shape == (1, 5, 32)
    with pytest.raises(ModelError, match="no model type 'bertt'"):
        sk.zoo.external("hf:bertt")
    with pytest.raises(ModelError, match="unknown head"):
        sk.zoo.external("hf:bert", head="vision")
    with pytest.raises(ModelError, match="no config.json"):
        sk.zoo.external(f"hf:{tmp_path}")
    # a file names a model type, never a directory to read
    with pytest.raises(ModelError, match="no model type"):
        build_source({"kind": "hf", "ref": str(tmp_path / "cfg"), "kwargs": {}})


def test_timm_batchnorm_act_folds_into_its_conv_and_keeps_its_activation(tmp_path):
    """timm's BatchNormAct2d (BN + activation in one module) folds into the preceding convolution like a
    plain BatchNorm: no float BatchNormalization is left in the int8 file, the activation still runs, and the
    file and the reloaded model agree with the simulation."""
    from slimkit.core.task import tensor_task
    from slimkit.export.runtimes import check_parity
    from slimkit.quantize.export import onnx_op_counts

    torch.manual_seed(0)
    model = sk.zoo.external("timm:test_efficientnet", num_classes=10).eval()
    shape = model.default_cfg["input_size"]
    x = torch.randn(48, *shape)
    task = tensor_task("random", x[:32], torch.arange(32) % 10, x[32:], torch.arange(16) % 10, input_shape=shape)
    q = sk.quantize(model, sk.QuantConfig(speed_check=False, calibration_samples=32), task=task)
    with torch.no_grad():
        assert sk.sqnr_db(model(x), q(x)) > 15  # the activations survived the fold
    path = sk.export(q, tmp_path / "q.onnx", example_input=x[:1])
    ops = onnx_op_counts(path)
    assert "BatchNormalization" not in ops and ops.get("QLinearConv", 0) >= 10
    parity = check_parity(q, path, x)
    assert parity["mean_abs_diff"] < 0.1 * parity["output_std"]
    loaded = sk.load(sk.save(q, tmp_path / "q.safetensors"))
    with torch.no_grad():
        assert torch.allclose(loaded(x[:4]), q(x[:4]), atol=1e-5)

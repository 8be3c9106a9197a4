"""The registry contract, in the style of PEFT's TEST_CASES: one table of (technique, model, config) rows, each
run through the same generic checks (`slimkit.core.contract.check`): the input model is untouched, the stage
is recorded, its config round-trips through JSON, the output shape is right, and the written artifact reloads
with `allclose` outputs (ONNX: int8 kernels within a tenth of the output's spread of the simulation).

A row either expects the checks to pass ("ok") or names the typed error and reason the technique must refuse
with (a listed skip, never a crash). Every registered technique needs at least one row: registering a new one
without a row fails `test_every_registered_technique_has_a_row`.

The fast suite uses tiny-width members of the families (a CNN with depthwise convs and squeeze-excitation, one
with channel shuffle and split/concat, a ConvNeXt, a ViT, BERT, GPT-2, a Llama-style decoder) at small inputs;
`FULL` (marked slow: `make test-slow`) crosses every technique with every model, where any typed refusal counts
as a skip; `benchmarks/coverage.py` runs the same checks over the libraries' model registries at full size.
"""
from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

import slimkit as sk
from slimkit.core import registry
from slimkit.core.contract import ContractViolation, check, quick_configs
from slimkit.core.task import tensor_task

HAS_MODELS = find_spec("torchvision") is not None and find_spec("timm") is not None
HAS_HF = find_spec("transformers") is not None

CONFIGS = quick_configs()  # cheap: no recovery training (the contract is about promises, not accuracy)


def _images(shape, classes=10):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, *shape, generator=g), torch.arange(48) % classes
    return tensor_task("random images", x[:32], y[:32], x[32:], y[32:], num_classes=classes,
                       input_shape=tuple(shape), batch_size=16)


def _tokens(vocab=64, length=12, classes=2):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(1, vocab, (48, length), generator=g), torch.arange(48) % classes
    return tensor_task("random tokens", x[:32], y[:32], x[32:], y[32:], num_classes=classes,
                       input_shape=(length,), batch_size=16)


def _digits_lenet():
    from slimkit import data, zoo

    task = data.digits()
    return zoo.for_task("lenet5", task, seed=0).eval(), task


def _external(ref, task, **kwargs):
    def make():
        torch.manual_seed(0)
        model = sk.zoo.external(ref, **kwargs).eval()
        return model, task() if callable(task) else task
    return make


HF_SMALL = dict(vocab_size=64, max_position_embeddings=16)
# name -> (builder returning (model, task), what it needs installed)
MODELS = {
    "lenet5": (_digits_lenet, True),
    "mobilenet_v3": (_external("torchvision:mobilenet_v3_small", lambda: _images((3, 32, 32)), num_classes=10,
                               width_mult=0.25), HAS_MODELS),
    "shufflenet_v2": (_external("torchvision:shufflenet_v2_x0_5", lambda: _images((3, 32, 32)), num_classes=10),
                      HAS_MODELS),
    "convnext": (_external("timm:test_convnext", lambda: _images((3, 160, 160)), num_classes=10), HAS_MODELS),
    "vit": (_external("timm:test_vit", lambda: _images((3, 160, 160)), num_classes=10), HAS_MODELS),
    "bert": (_external("hf:bert", _tokens, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, head="classifier", num_labels=2, **HF_SMALL), HAS_HF),
    "distilbert": (_external("hf:distilbert", _tokens, dim=32, n_layers=2, n_heads=4, hidden_dim=64, head="classifier",
                             num_labels=2, **HF_SMALL), HAS_HF),
    "gpt2": (_external("hf:gpt2", _tokens, n_embd=32, n_layer=2, n_head=4, n_positions=16, head="causal-lm",
                       vocab_size=64, bos_token_id=0, eos_token_id=0), HAS_HF),
    "llama": (_external("hf:llama", _tokens, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head="causal-lm", **HF_SMALL), HAS_HF),
}

NO_HEADS = ("UnsupportedLayerError", "no BERT-style attention")
NO_CONV = ("SelectorError", "matched no layer")
NOT_LOGITS = ("ModelError", "needs class logits")
# (technique, model, expected): "ok", or (typed error class name, text its message contains)
CASES = [
    *[(t, "lenet5", "ok") for t in CONFIGS if t != "prune_heads"],
    ("prune_heads", "lenet5", NO_HEADS),
    ("prune", "mobilenet_v3", "ok"),
    ("prune_structured", "mobilenet_v3", "ok"),
    ("factorize", "mobilenet_v3", "ok"),
    ("separable", "mobilenet_v3", "ok"),
    ("quantize", "mobilenet_v3", "ok"),
    ("pack", "shufflenet_v2", "ok"),
    ("prune_structured", "shufflenet_v2", ("UnsupportedLayerError", "cannot trace ShuffleNetV2")),
    ("quantize", "shufflenet_v2", "ok"),
    ("prune", "convnext", "ok"),
    ("quantize", "convnext", "ok"),
    ("factorize", "vit", "ok"),
    ("quantize", "vit", "ok"),
    ("distill", "vit", "ok"),
    ("prune_structured", "vit", "ok"),  # heads narrowed, class token and position embedding cut with the channels
    ("prune_structured", "convnext", "ok"),  # LayerScale gamma
    ("prune_heads", "bert", "ok"),
    ("prune", "bert", "ok"),
    ("factorize", "bert", "ok"),
    ("quantize", "bert", "ok"),
    ("separable", "bert", NO_CONV),
    ("prune_structured", "bert", "ok"),
    ("prune_structured", "distilbert", "ok"),
    ("prune_structured", "llama", ("UnsupportedLayerError", "separate q/k/v projections")),
    ("prune_structured", "gpt2", ("UnsupportedLayerError", "whose channel dimension the dependency graph cannot tell")),
    ("quantize", "gpt2", "ok"),
    ("distill", "gpt2", NOT_LOGITS),
    ("pack", "llama", "ok"),
    ("quantize", "llama", "ok"),
]


def missing_rows(cases, names) -> set[str]:
    """Registered techniques without a row in `cases`."""
    return set(names) - {technique for technique, _, _ in cases}


def test_every_registered_technique_has_a_row():
    missing = missing_rows(CASES, [t.name for t in registry.techniques()])
    assert not missing, f"technique(s) without a contract row in tests/test_contract.py CASES: {sorted(missing)}"
    assert set(CONFIGS) == {t.name for t in registry.techniques()}


def test_a_technique_without_a_row_is_found(monkeypatch):
    import dataclasses

    monkeypatch.setitem(registry._REGISTRY, "rowless", dataclasses.replace(registry.get("prune"), name="rowless"))
    assert missing_rows(CASES, [t.name for t in registry.techniques()]) == {"rowless"}


_built: dict[str, tuple] = {}


def _model(name):
    build, available = MODELS[name]
    if not available:
        pytest.skip(f"{name}: the optional extra it needs is not installed")
    if name not in _built:
        _built[name] = build()
    return _built[name]


@pytest.mark.parametrize("technique,model_name,expected", CASES, ids=[f"{t}-{m}" for t, m, _ in CASES])
def test_contract(technique, model_name, expected, tmp_path):
    model, task = _model(model_name)
    outcome = check(model, CONFIGS[technique], task, tmp_path, measure=False)
    if expected == "ok":
        assert outcome.status == "ok", outcome.reason
        assert outcome.artifact_bytes > 0
    else:
        error, text = expected
        assert (outcome.status, outcome.error) == ("skip", error), outcome
        assert text in outcome.reason


def test_a_broken_promise_is_caught(tmp_path, monkeypatch):
    """The checks can fail: a technique that changes its input model in place is a violation."""
    import dataclasses

    model, task = _model("lenet5")
    model = sk.load(sk.save(model, tmp_path / "m.safetensors"))  # a private copy to break
    honest = registry.get("prune")

    def in_place(m, config, task=None, **kw):
        out = honest.apply(m, config, task=task, **kw)
        with torch.no_grad():
            next(m.parameters()).mul_(0)
        return out

    monkeypatch.setitem(registry._REGISTRY, "prune", dataclasses.replace(honest, apply=in_place))
    with pytest.raises(ContractViolation, match="prune: the input model was changed"):
        check(model, CONFIGS["prune"], task, tmp_path)


FULL = [(t, m) for m in MODELS for t in CONFIGS if not (t == "nas" and m != "lenet5")]


@pytest.mark.slow
@pytest.mark.parametrize("technique,model_name", FULL, ids=[f"{t}-{m}" for t, m in FULL])
def test_contract_full_matrix(technique, model_name, tmp_path):
    """Every technique on every family: the checks pass, or a typed refusal (never a crash or a wrong shape)."""
    model, task = _model(model_name)
    outcome = check(model, CONFIGS[technique], task, tmp_path)
    assert outcome.status in ("ok", "skip")

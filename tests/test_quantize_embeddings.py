"""Embedding tables (Gather) quantized in every mode: integer codes in the ONNX file, ONNX Runtime's
lookups equal to the simulation, per-row scales, save/load, what stays float."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.quantize import QuantConfig, check_parity, export_quantized
from slimkit.quantize.export import onnx_op_counts
from slimkit.quantize.graph import embedding_tables


class TokenNet(nn.Module):
    """Token and position embeddings -> Linear -> ReLU -> Linear -> masked mean pooling."""

    def __init__(self, vocab: int = 300, dim: int = 32, max_norm: float | None = None):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0, max_norm=max_norm)
        self.pos = nn.Embedding(16, dim)
        self.a, self.b = nn.Linear(dim, 64), nn.Linear(64, 8)

    def forward(self, ids, mask):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        h = self.b(torch.relu(self.a(h)))
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)


def build_token_net() -> nn.Module:
    torch.manual_seed(0)
    return TokenNet().eval()


def _tokens(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (n, 12), generator=g)
    mask = (torch.arange(12)[None] < torch.randint(3, 13, (n,), generator=g)[:, None]).long()
    return torch.where(mask.bool(), ids, torch.zeros_like(ids)), mask


def _initializer_types(path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(data type, shape) of every constant tensor in the file: initializers and Constant nodes."""
    graph = onnx.load(str(path)).graph
    tensors = list(graph.initializer) + [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute]
    return {t.name or str(i): (t.data_type, tuple(t.dims)) for i, t in enumerate(tensors)}


def test_dynamic_int8_stores_tables_as_int8_and_ort_gathers_them_like_the_simulation(tmp_path):
    model = build_token_net()
    ids, mask = _tokens()
    q = sk.quantize(model, QuantConfig(weights="int8", activations="uint8", mode="dynamic", speed_check=False))
    assert set(embedding_tables(q)) == {"tok", "pos"}
    assert any("2 embedding table(s)" in n and "int8" in n for n in q.slimkit_notes)
    path = export_quantized(q, tmp_path / "q.onnx", (ids[:1], mask[:1]))
    kept = export_quantized(sk.quantize(model, QuantConfig(mode="dynamic", embeddings=False, speed_check=False)),
                            tmp_path / "kept.onnx", (ids[:1], mask[:1]))
    inits = _initializer_types(path)
    assert (onnx.TensorProto.INT8, (300, 32)) in inits.values()  # the token table as int8 codes
    assert (onnx.TensorProto.FLOAT, (300, 32)) not in inits.values()  # and not also as float
    assert (onnx.TensorProto.FLOAT, (300, 32)) in _initializer_types(kept).values()
    assert (onnx.TensorProto.FLOAT16, (300, 1)) in inits.values()  # one float16 scale per row
    # the tables shrink from 4 bytes to 1 byte + one fp16 scale per row
    saved = kept.stat().st_size - path.stat().st_size
    assert saved > 0.95 * (3 * 32 - 2) * (300 + 16)
    parity = check_parity(q, path, (ids, mask))
    assert parity["max_abs_diff"] < 1e-2 * parity["output_std"]  # dynamic activations may round one code apart
    with torch.no_grad():
        assert sk.sqnr_db(model(ids, mask), q(ids, mask)) > 30


def test_int4_groups_gather_packed_with_gather_block_quantized(tmp_path):
    model = build_token_net()
    ids, mask = _tokens()
    q = sk.quantize(model, QuantConfig(weights="int4", activations="none", mode="weight_only", group_size=16))
    assert q.slimkit_simulated is False
    path = export_quantized(q, tmp_path / "q4.onnx", (ids[:1], mask[:1]))
    assert onnx_op_counts(path, optimized=False).get("GatherBlockQuantized") == 2
    inits = _initializer_types(path)
    assert (onnx.TensorProto.UINT8, (300, 16)) in inits.values()  # two 4-bit codes per byte
    assert (onnx.TensorProto.FLOAT, (300, 2)) in inits.values()  # one scale per 16 weights of a row
    parity = check_parity(q, path, (ids, mask))
    assert parity["max_abs_diff"] < 1e-5


def test_fp16_row_scales_round_up_and_keep_tiny_scales():
    from slimkit.quantize.embedding import fp16_scales

    s = torch.tensor([1e-3, 0.1234567, 3.0, 1e-6, 1e-12])
    h = fp16_scales(s)
    assert (h >= s).all() and (h.half().float() == h).all()  # rounded up to float16 values
    assert (h[:3] / s[:3] - 1 < 2 ** -10).all()  # by less than one step in float16's normal range
    assert h[4] == 2.0 ** -24  # an all-zero row's scale: the smallest float16, never 0
    big = torch.tensor([1.0, 1e6])
    assert torch.equal(fp16_scales(big), big)  # beyond float16: float32 kept


def test_per_row_scales_keep_an_outlier_row_from_coarsening_the_others():
    model = build_token_net()
    with torch.no_grad():
        model.tok.weight[5] *= 100
    q = sk.quantize(model, QuantConfig(mode="dynamic", speed_check=False))
    table = embedding_tables(q)["tok"]
    w = model.tok.weight.detach()
    err = table.quantized_weight() - w
    others = torch.ones(300, dtype=torch.bool)
    others[5] = False
    assert sk.sqnr_db(w[others], w[others] + err[others]) > 38  # int8 per row: about 6 dB per bit
    # the lookup path returns exactly those rows
    ids = torch.tensor([[5, 1, 2]])
    with torch.no_grad():
        assert torch.allclose(table(ids)[0], table.quantized_weight()[[5, 1, 2]])


def test_save_load_roundtrip_keeps_the_quantized_tables(tmp_path):
    model = build_token_net()
    ids, mask = _tokens()
    q = sk.quantize(model, QuantConfig(weights="int4", activations="none", mode="weight_only", group_size=16))
    path = sk.save(q, tmp_path / "q.safetensors", factory=build_token_net)
    loaded = sk.load(path)
    assert set(embedding_tables(loaded)) == {"tok", "pos"}
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), q(ids, mask))
    plain = sk.quantize(model, QuantConfig(mode="dynamic", embeddings=False, speed_check=False))
    reloaded = sk.load(sk.save(plain, tmp_path / "plain.safetensors", factory=build_token_net))
    assert not embedding_tables(reloaded) and isinstance(reloaded.tok, nn.Embedding)


def test_files_written_before_tables_were_quantized_reload_with_float_tables():
    """A stage record without "embeddings" (older files) rebuilds the float tables it was saved with."""
    from slimkit.core.state import get_state
    from slimkit.quantize.apply import restore

    q = sk.quantize(build_token_net(), QuantConfig(mode="dynamic", speed_check=False))
    structure = dict(get_state(q)["stages"][-1]["structure"])
    del structure["embeddings"]
    rebuilt = restore(build_token_net(), QuantConfig(mode="dynamic", speed_check=False), structure)
    assert not embedding_tables(rebuilt) and set(structure["layers"]) == {"a", "b"}


def test_excluded_and_max_norm_tables_stay_float_and_are_listed():
    q = sk.quantize(build_token_net(), QuantConfig(mode="dynamic", keep_float=["pos"], speed_check=False))
    assert set(embedding_tables(q)) == {"tok"}
    assert any("pos (Embedding)" in n for n in q.slimkit_notes if n.startswith("kept in float"))
    torch.manual_seed(0)
    renorm = TokenNet(max_norm=1.0).eval()  # lookups rewrite the table: not a constant to quantize
    q = sk.quantize(renorm, QuantConfig(mode="dynamic", speed_check=False))
    assert set(embedding_tables(q)) == {"pos"}
    assert any("tok (Embedding)" in n for n in q.slimkit_notes if n.startswith("kept in float"))


def test_static_int8_traced_model_quantizes_its_table_and_exports(tmp_path):
    model = build_token_net()
    ids, mask = _tokens(64)
    batches = [(ids[i:i + 16], mask[i:i + 16]) for i in range(0, 64, 16)]
    q = sk.quantize(model, QuantConfig(weights="int8", activations="uint8", calibration="minmax", speed_check=False),
                    calibration_data=batches)
    assert set(embedding_tables(q)) == {"tok", "pos"}
    path = export_quantized(q, tmp_path / "s.onnx", (ids[:1], mask[:1]))
    assert (onnx.TensorProto.INT8, (300, 32)) in _initializer_types(path).values()
    parity = check_parity(q, path, (ids, mask))
    assert parity["max_abs_diff"] < 2e-2 * parity["output_std"]


@pytest.mark.parametrize("bits", [2, 16])
def test_other_widths_store_codes_in_the_nearest_integer_type(bits, tmp_path):
    model = build_token_net()
    ids, mask = _tokens()
    q = sk.quantize(model, QuantConfig(weights=f"int{bits}", activations="none", mode="weight_only"))
    table = embedding_tables(q)["tok"]
    codes = table.weight_codes()
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    path = export_quantized(q, tmp_path / f"q{bits}.onnx", (ids[:1], mask[:1]))
    kind = onnx.TensorProto.INT16 if bits == 16 else onnx.TensorProto.INT8
    assert (kind, (300, 32)) in _initializer_types(path).values()
    with torch.no_grad():
        np.testing.assert_allclose(table(ids).numpy(), table.quantized_weight()[ids].numpy())
    parity = check_parity(q, path, (ids, mask))  # int2 Linear layers are simulated: they export as float
    assert parity["max_abs_diff"] < 1e-4 * max(parity["output_std"], 1.0)

"""The Deep-Compression `.slim` format: bit packing, relative indices, pack/unpack, corruption."""
import struct
import zlib

import numpy as np
import pytest
import torch

import slimkit as sk
from slimkit.cli.main import main
from slimkit.errors import ArtifactError, ConfigError
from slimkit.prune import PackConfig, PruneConfig, packed_info, write_packed
from slimkit.prune import packed
from slimkit.prune.packed import _header_dictionary, pack_bits, positions_from_relative, relative_index, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=1001)
    data = pack_bits(codes, bits)
    assert len(data) == -(-1001 * bits // 8)
    assert np.array_equal(unpack_bits(data, bits, 1001), codes)
    with pytest.raises(ValueError):
        unpack_bits(data[:-1], bits, 1001)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_relative_index_round_trip_with_fillers(bits):
    positions = np.sort(np.random.default_rng(0).choice(5000, size=300, replace=False))
    stored, filler = relative_index(positions, bits)
    assert stored.max() < (1 << bits)
    decoded = positions_from_relative(stored)
    assert np.array_equal(decoded[~filler], positions)
    assert filler.sum() == 0 or bits < 8  # 8-bit gaps rarely need fillers here; small ones do
    if bits == 1:
        assert filler.sum() > 0


@pytest.fixture(scope="module")
def pruned_lenet5(trained_lenet5):
    return sk.prune(trained_lenet5, PruneConfig(sparsity=0.9, recovery="none"))


def test_lossless_sparse_pack_is_exact_and_small(tmp_path, pruned_lenet5, digits_task):
    sizes = write_packed(pruned_lenet5, tmp_path / "m.slim")
    dense = sk.save(pruned_lenet5, tmp_path / "m.safetensors").stat().st_size
    again = sk.load(tmp_path / "m.slim")
    for (k, a), (_, b) in zip(pruned_lenet5.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert sizes["total"] == (tmp_path / "m.slim").stat().st_size
    assert sum(v for k, v in sizes.items() if k not in ("total", "path")) == sizes["total"]
    assert sizes["total"] < dense / 3  # 90% zeros stored sparse, fp32 values


def test_large_layers_are_ranked_fast_and_still_lossless(tmp_path, trained_mlp, digits_task):
    """A layer above FAST_RANKING_ELEMENTS (LeNet-300-100's first, 235,200 weights) picks its coding with the
    fast zstd level; the file is still exact and stores the layer sparse."""
    pruned = sk.prune(trained_mlp, PruneConfig(sparsity=0.9, recovery="none"))
    assert pruned[1].weight.numel() > packed.FAST_RANKING_ELEMENTS
    sizes = write_packed(pruned, tmp_path / "m.slim")
    again = sk.load(tmp_path / "m.slim")
    for (k, a), (_, b) in zip(pruned.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    coding = packed_info(tmp_path / "m.slim")["tensors"]["1.weight"]
    assert coding.startswith(("bitmask", "relative")), coding
    assert sizes["total"] < 0.25 * sk.save(pruned, tmp_path / "m.safetensors").stat().st_size


def test_packed_header_keeps_each_stage_config_exactly(tmp_path, trained_lenet5, digits_task):
    """The header stores configs without their defaults; reading rebuilds the same configs, including a
    recovery whose method differs from the stage's default (finetune) but not from RecoveryConfig's."""
    config = PruneConfig(sparsity=0.6, recovery={"method": "distill", "epochs": 0})
    pruned = sk.prune(trained_lenet5, config, task=digits_task)
    write_packed(pruned, tmp_path / "m.slim")
    stage = sk.load(tmp_path / "m.slim").slimkit_state["stages"][-1]
    assert stage["config"] == {"sparsity": 0.6, "recovery": {"method": "distill", "epochs": 0}}
    assert PruneConfig.from_dict(stage["config"]) == config


@pytest.mark.parametrize("quantization", ["kmeans", "linear"])
def test_pack_unpack_allclose_and_shared_values(tmp_path, pruned_lenet5, digits_task, quantization):
    result = sk.pack(pruned_lenet5, tmp_path / "q.slim", PackConfig(quantization=quantization, bits=5, conv_bits=8))
    packed = result["model"]
    loaded = sk.load(tmp_path / "q.slim")
    x = digits_task.example_input(32)
    assert torch.allclose(loaded(x), packed(x), atol=1e-5)
    fc = packed.classifier[1].weight
    assert len(torch.unique(fc[fc != 0])) <= 31  # 5-bit codes, code 0 is the zero
    assert torch.equal(fc == 0, pruned_lenet5.classifier[1].weight == 0)  # sparsity pattern kept
    # quantization error is bounded: the outputs barely move
    assert (packed(x).argmax(1) == pruned_lenet5(x).argmax(1)).float().mean() > 0.9
    dense = sk.save(pruned_lenet5, tmp_path / "d.safetensors").stat().st_size
    assert result["bytes"]["total"] < dense / 15
    info = packed_info(tmp_path / "q.slim")
    assert info["bytes"]["total"] == result["bytes"]["total"]
    assert "codes" in info["tensors"]["classifier.1.weight"]


def test_deep_compression_pipeline_with_codebook_finetune(tmp_path, trained_lenet5, digits_task):
    config = PackConfig(prune=PruneConfig(sparsity=0.9, recovery={"epochs": 2}), codebook_epochs=1, dense_dtype="float16")
    result = sk.pack(trained_lenet5, tmp_path / "dc.slim", config, task=digits_task)
    loaded = sk.load(tmp_path / "dc.slim")
    x = digits_task.example_input(32)
    assert torch.allclose(loaded(x), result["model"](x), atol=1e-5)
    assert [s["technique"] for s in loaded.slimkit_state["stages"]] == ["prune", "pack"]
    from slimkit.core.trainer import accuracy

    assert accuracy(loaded, digits_task, "test") >= accuracy(trained_lenet5, digits_task, "test") - 0.05
    assert result["bytes"]["total"] * 20 < sk.save(trained_lenet5, tmp_path / "b.safetensors").stat().st_size


def test_budget_search_stays_within_the_validation_budget(tmp_path, trained_lenet5, digits_task):
    from slimkit.core.trainer import accuracy

    config = PackConfig(budget=1.0, sparsity_ladder=[0.5, 0.8, 0.9, 0.97], step_epochs=2, codebook_epochs=2,
                        dense_dtype="float16")
    result = sk.pack(trained_lenet5, tmp_path / "b.slim", config, task=digits_task)
    loaded = sk.load(tmp_path / "b.slim")
    base = accuracy(trained_lenet5, digits_task, "val")
    assert 100 * (base - accuracy(loaded, digits_task, "val")) <= 1.0 + 1e-9
    x = digits_task.example_input(16)
    assert torch.allclose(loaded(x), result["model"](x), atol=1e-5)
    layers = loaded.slimkit_state["stages"][-1]["structure"]["layers"]
    assert set(layers) == {"features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"}
    for name, chosen in layers.items():
        w = loaded.get_submodule(name).weight
        assert chosen["bits"] in config.bits_grid
        assert len(torch.unique(w[w != 0])) <= (1 << chosen["bits"]) - 1
        assert abs(float((w == 0).float().mean()) - chosen["sparsity"]) < 1e-3
        bias = loaded.get_submodule(name).bias
        if "bias_bits" in chosen:  # a coded bias holds at most 2**bits - 1 shared values and is smaller coded
            assert len(torch.unique(bias[bias != 0])) <= (1 << chosen["bias_bits"]) - 1
            assert bias.numel() * chosen["bias_bits"] / 8 + 2 * ((1 << chosen["bias_bits"]) - 1) < 2 * bias.numel()
    # the 120- and 84-unit biases are worth coding (the whole-model retry may give some back to float16)
    assert {"classifier.1", "classifier.3"} & {n for n, c in layers.items() if "bias_bits" in c}
    steps = [t["step"] for t in result["search"]]
    assert steps[:2] == ["unpruned", "sensitivity scan"] and "prune" in steps and steps[-1] == "quantize"
    accepted = [t for t in result["search"] if t["step"] == "prune" and t["within"]]
    assert accepted, "a 1-point budget allows at least 50% sparsity on digits"
    # the sparsity kept is that of the last rung within the budget (or a lower one)
    assert float(sum((loaded.get_submodule(n).weight == 0).sum() for n in layers)) > 0
    assert any("budget search" in n for n in result["model"].slimkit_notes)


def test_budget_search_tries_the_midpoint_below_a_rung_that_misses(tmp_path, trained_lenet5, digits_task, monkeypatch):
    from slimkit.prune import deep
    from slimkit.prune.masks import sparsity_of

    names = ["features.0", "features.3", "classifier.1", "classifier.3", "classifier.5"]
    # a validation accuracy that falls off a cliff above 85% sparsity, whatever the weights
    monkeypatch.setattr(deep, "accuracy", lambda m, task, split: 0.99 if sparsity_of(m, names) < 0.85 else 0.5)
    config = PackConfig(budget=0.3, sparsity_ladder=[0.5, 0.9, 0.95], step_epochs=0, codebook_epochs=0)
    result = sk.pack(trained_lenet5, tmp_path / "m.slim", config, task=digits_task)
    rungs = [(t["sparsity"], t["within"]) for t in result["search"] if t["step"] == "prune"]
    assert [round(s, 2) for s, _ in rungs] == [0.5, 0.9, 0.7] and [w for _, w in rungs] == [True, False, True]
    assert abs(sparsity_of(result["model"], names) - 0.7) < 0.01  # 0.95 is never tried: 0.9 already missed


def test_budget_search_error_paths(trained_lenet5, digits_task):
    with pytest.raises(ConfigError, match="validation"):
        sk.pack(trained_lenet5, "unused.slim", PackConfig(budget=0.5))
    with pytest.raises(ConfigError, match="kmeans"):
        sk.pack(trained_lenet5, "unused.slim", PackConfig(budget=0.5, quantization="linear"), task=digits_task)
    with pytest.raises(ValueError):
        PackConfig(budget=0.5, sparsity_ladder=[0.5, 1.0])
    with pytest.raises(ValueError):
        PackConfig(budget=0.5, bits_grid=[0, 4])


def test_codebook_finetune_needs_task(trained_lenet5):
    with pytest.raises(ConfigError, match="task"):
        sk.pack(trained_lenet5, "unused.slim", PackConfig(codebook_epochs=1))


def _corrupt(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] ^ 0xFF) if value is None else value
    path.write_bytes(bytes(data))


def test_corrupt_files_raise_artifact_errors(tmp_path, pruned_lenet5):
    good = tmp_path / "good.slim"
    sk.pack(pruned_lenet5, good, PackConfig(quantization="kmeans"))
    data = good.read_bytes()
    cases = {
        "magic": data.replace(b"SLIM", b"XXXX", 1),
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "trailing": data + b"\0",
        "payload": data[:-10] + bytes([data[-10] ^ 1]) + data[-9:],
        "header": data[:12] + bytes([data[12] ^ 1]) + data[13:],
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.slim"
        bad.write_bytes(content)
        with pytest.raises(ArtifactError, match="slim"):
            sk.load(bad)


def test_consistent_checksums_but_wrong_content_is_caught(tmp_path, pruned_lenet5):
    """A file re-checksummed after tampering (so CRCs pass) must still fail cleanly, not load wrong."""
    import json

    import zstandard as zstd

    good = tmp_path / "good.slim"
    sk.pack(pruned_lenet5, good, PackConfig())
    data = good.read_bytes()
    _, version, hlen, _ = struct.unpack_from("<4sBII", data)
    dictionary = _header_dictionary(version)
    meta = json.loads(zstd.ZstdDecompressor(dict_data=dictionary).decompress(data[13:13 + hlen]))
    entry = next(e for e in meta["tensors"] if e["name"] == "classifier.1.weight")
    entry["shape"] = [entry["shape"][0], entry["shape"][1] * 2]  # claims twice the weights
    header = zstd.ZstdCompressor(dict_data=dictionary).compress(json.dumps(meta).encode())
    bad = tmp_path / "bad.slim"
    bad.write_bytes(struct.pack("<4sBII", b"SLIM", version, len(header), zlib.crc32(header)) + header + data[13 + hlen:])
    with pytest.raises(ArtifactError, match="bad.slim"):
        sk.load(bad)


def test_version_1_files_still_load_and_version_2_headers_are_smaller(tmp_path, pruned_lenet5, monkeypatch):
    new = sk.pack(pruned_lenet5, tmp_path / "v2.slim", PackConfig())["bytes"]
    with monkeypatch.context() as m:  # a file as slimkit wrote it before the header dictionary
        m.setattr(packed, "VERSION", 1)
        m.setattr(packed, "FORMAT", "slimkit-packed/1")
        old = sk.pack(pruned_lenet5, tmp_path / "v1.slim", PackConfig())["bytes"]
    assert (tmp_path / "v1.slim").read_bytes()[4] == 1 and (tmp_path / "v2.slim").read_bytes()[4] == 2
    a, b = sk.load(tmp_path / "v1.slim"), sk.load(tmp_path / "v2.slim")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert new["header"] < 0.7 * old["header"]
    assert {k: v for k, v in new.items() if k not in ("header", "total")} == \
        {k: v for k, v in old.items() if k not in ("header", "total")}
    data = bytearray((tmp_path / "v2.slim").read_bytes())
    data[4] = 9
    (tmp_path / "v9.slim").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="version 9 is not supported"):
        sk.load(tmp_path / "v9.slim")


def test_cli_pack_and_prune(tmp_path, trained_lenet5, capsys):
    src = sk.save(trained_lenet5, tmp_path / "m.safetensors")
    out = tmp_path / "m.slim"
    assert main(["pack", str(src), "--sparsity", "0.9", "--prune-epochs", "0", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size * 10 < src.stat().st_size
    assert "bytes" in capsys.readouterr().out
    assert main(["prune", str(src), "--sparsity", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["prune", str(src), "--epochs", "0", "--include", "nothing.*", "--out", str(tmp_path / "x")]) == 2
    assert main(["pack", str(src), "--out", str(tmp_path / "x.bin")]) == 2
    assert main(["prune", str(src), "--sparsity", "0.5", "--epochs", "0", "--out", str(tmp_path / "p")]) == 0
    pruned = sk.load(tmp_path / "p.slim")  # what the CLI wrote: half of the weights zero, the rest kept
    w = [(m.weight, o.weight) for m, o in zip(pruned.modules(), trained_lenet5.modules())
         if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    zeros = sum(int((p == 0).sum()) for p, _ in w) / sum(p.numel() for p, _ in w)
    assert 0.45 <= zeros <= 0.55
    assert all(torch.equal(p[p != 0], o[p != 0]) for p, o in w)

"""The packed `.slim` format: Deep Compression storage (sparse index + shared values + zstd).

Layout (all integers little-endian):

    b"SLIM" | u8 version | u32 header length | u32 CRC-32 of the header | header | streams

The header is zstd-compressed JSON (version 2: against a fixed dictionary of the format's own keys,
`_HEADER_DICTIONARY_V2`; version 1 files, without it, still load): the model manifest (source + stages, as in `slimkit.save`),
one entry per tensor saying how it is encoded, and the compressed length, raw length and CRC-32 of
each stream. Four streams hold the parts of every tensor, each compressed once with zstd so the
bytes of every part can be reported: `index` (bitmask or relative positions of non-zeros),
`values` (codes into a codebook, or raw floats), `codebook` (shared values per layer) and `dense`
(tensors stored as they are: biases, norms, buffers).

The writer is lossless: a tensor becomes codebook-coded only if it already has at most 255
distinct non-zero values (which `pack` quantization produces), and floats are stored as float16
only when they round-trip exactly. Any damage is caught by the CRCs and the structural checks
and reported as `ArtifactError`, never as a zstd crash or a silently wrong model.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import slimkit
from slimkit.core.io import atomic_path
from slimkit.core.state import get_state
from slimkit.errors import ArtifactError, ModelError

MAGIC = b"SLIM"
VERSION = 2
FORMAT = "slimkit-packed/2"
READS = (1, 2)
STREAMS = ("index", "values", "codebook", "dense")
_PREFIX = struct.Struct("<4sBII")

# Version 2 compresses the header against this fixed zstd raw-content dictionary: the format's own
# keys and values in the order the writer emits them, and common PyTorch parameter names. On a
# ~5 kB LeNet-5 file it halves the header (772 -> 369 B). It is part of the format: never edit it
# (a change needs a new version, and readers keep this one for version 2 files).
_HEADER_DICTIONARY_V2 = (
    '{"manifest":{"format":"slimkit-packed/2","slimkit_version":"0.1.0","torch_version":"2.13.0+cpu",'
    '"source":{"kind":"zoo","ref":"","kwargs":{"in_channels":1,"input_size":28,"num_classes":10}},'
    '"stages":[{"technique":"prune","config":{"sparsity":0.9,"finetune_epochs":0},"structure":{"sparsity":0.9,'
    '"layers":{}},"version":"0.1.0"},{"technique":"pack","config":{"bits":5,"conv_bits":5,"codebook_epochs":5,'
    '"dense_dtype":"float16","budget":0.3},"structure":{"budget":0.3,"layers":{"":{"sparsity":0.9,"bits":5}}},'
    '"version":"0.1.0"}]},"streams":{"index":[,],"values":[,],"codebook":[,],"dense":[,]},"tensors":['
    + "".join('{"name":"features.0.weight","shape":[],"dtype":"float32","encoding":"coded",' + kind
              + ',"values":{"kind":"codes","bits":5,"layout":"bytes","count":,"codebook":{"dtype":"float16","size":}},'
              '"parts":{"index":[0,],"values":[0,],"codebook":[0,]}},'
              for kind in ('"index":{"kind":"dense"}', '"index":{"kind":"bitmask"}',
                           '"index":{"kind":"relative","bits":8,"layout":"packed","count":'))
    + '"values":{"kind":"float16","count":},{"name":"classifier.1.bias","shape":[],"dtype":"float32",'
    '"encoding":"raw","store":"float16","parts":{"dense":[0,]}},".weight",".bias",".running_mean",".running_var",'
    '".num_batches_tracked","dtype":"int64","store":"int64"').encode()


def _header_dictionary(version: int):
    import zstandard as zstd

    if version == 1:
        return None
    return zstd.ZstdCompressionDict(_HEADER_DICTIONARY_V2, dict_type=zstd.DICT_TYPE_RAWCONTENT)


# -- bit packing -----------------------------------------------------------------------------
def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers < 2**bits into a dense big-endian bit string."""
    codes = np.asarray(codes, dtype=np.uint32)
    planes = ((codes[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel()).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    needed = math.ceil(count * bits / 8)
    if len(data) != needed:
        raise ValueError(f"{len(data)} bytes for {count} {bits}-bit codes (expected {needed})")
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    return (planes.astype(np.uint32) << np.arange(bits - 1, -1, -1, dtype=np.uint32)).sum(1, dtype=np.uint32)


def _codes_bytes(codes: np.ndarray, bits: int, layout: str) -> bytes:
    return pack_bits(codes, bits) if layout == "packed" else np.asarray(codes, dtype=np.uint8).tobytes()


def _codes_from(data: bytes, bits: int, layout: str, count: int) -> np.ndarray:
    if layout == "packed":
        return unpack_bits(data, bits, count)
    if len(data) != count:
        raise ValueError(f"{len(data)} bytes for {count} byte codes")
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint32)


# -- relative indices (Deep Compression, sec. 3) -----------------------------------------------
def relative_index(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode sorted positions as gaps of `bits` bits. A gap too large for `bits` gets filler
    entries (whose value is zero). Returns (stored gaps, is_filler) with one entry per stored value."""
    span = 1 << bits
    gaps = np.diff(np.concatenate([[-1], positions])) - 1  # >= 0
    fillers = gaps // span
    count = fillers + 1
    stored = np.full(int(count.sum()), span - 1, dtype=np.int64)
    last = np.cumsum(count) - 1
    stored[last] = gaps - fillers * span
    is_filler = np.ones(len(stored), dtype=bool)
    is_filler[last] = False
    return stored, is_filler


def positions_from_relative(stored: np.ndarray) -> np.ndarray:
    return np.cumsum(stored.astype(np.int64) + 1) - 1


# -- tensor encoding ---------------------------------------------------------------------------
def _float16_exact(values: np.ndarray) -> bool:
    return values.dtype == np.float32 and bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def _raw(tensor: torch.Tensor) -> tuple[bytes, str]:
    """Bytes and storage dtype of a tensor kept as is (float16 when that is exact)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.float32 and _float16_exact(t.numpy().ravel()):
        return t.half().reshape(-1).view(torch.uint8).numpy().tobytes(), "float16"
    return t.reshape(-1).view(torch.uint8).numpy().tobytes(), str(t.dtype).replace("torch.", "")


def _candidates(flat: np.ndarray):
    """Yield (description, {stream: bytes}) for every way of coding one float32 tensor."""
    nonzero = np.flatnonzero(flat)
    values = flat[nonzero]
    unique = np.unique(values)
    codebook = None
    if len(unique) <= 255:
        # code 0 is the zero (used by dense codes and by relative-index fillers)
        codebook = np.concatenate([[0.0], unique]).astype(np.float32)
        cb_bytes, cb_dtype = (codebook.astype(np.float16).tobytes(), "float16") if _float16_exact(codebook) \
            else (codebook.tobytes(), "float32")
        code_bits = max(1, math.ceil(math.log2(len(codebook))))
        layouts = ("packed", "bytes")

    def value_parts(entries: np.ndarray, filler: np.ndarray | None):
        """Values of stored entries: codes into the codebook, or raw floats (fillers are 0)."""
        if codebook is not None:
            codes = np.searchsorted(codebook[1:], entries) + 1
            codes[entries == 0] = 0
            if filler is not None:
                codes[filler] = 0
            for layout in layouts:
                yield ({"kind": "codes", "bits": code_bits, "layout": layout, "count": len(entries),
                        "codebook": {"dtype": cb_dtype, "size": len(codebook)}},
                       {"values": _codes_bytes(codes, code_bits, layout), "codebook": cb_bytes})
        vals = entries.astype(np.float32)
        if filler is not None:
            vals[filler] = 0.0
        # raw values: a codebook costs more than it saves when a layer has few non-zeros
        if _float16_exact(vals):
            yield ({"kind": "float16", "count": len(vals)}, {"values": vals.astype(np.float16).tobytes()})
        else:
            yield ({"kind": "float32", "count": len(vals)}, {"values": vals.tobytes()})

    # dense codes: every element coded, no index (only with a codebook; raw dense is the fallback)
    if codebook is not None:
        for v_desc, v_parts in value_parts(flat, None):
            yield {"index": {"kind": "dense"}, "values": v_desc}, v_parts
    # bitmask + values of the non-zeros
    mask_bytes = np.packbits(flat != 0).tobytes()
    for v_desc, v_parts in value_parts(values, None):
        yield {"index": {"kind": "bitmask"}, "values": v_desc}, {"index": mask_bytes, **v_parts}
    # relative indices with 1..8 bits
    for bits in range(1, 9):
        stored, filler = relative_index(nonzero, bits)
        entries = np.zeros(len(stored), dtype=np.float32)
        entries[~filler] = values
        for layout in ("packed", "bytes"):
            idx = {"kind": "relative", "bits": bits, "layout": layout, "count": len(stored)}
            for v_desc, v_parts in value_parts(entries, filler):
                yield {"index": idx, "values": v_desc}, {"index": _codes_bytes(stored, bits, layout), **v_parts}


# Tensors above this many elements rank their candidate codings with a fast zstd level: at level 19 the
# ~20 candidates of a 2.4 M-weight layer cost minutes; the ranking hardly changes, and the chosen coding's
# streams are still compressed at the file's level. Smaller tensors rank at the file's own level.
FAST_RANKING_ELEMENTS = 1 << 16
_FAST_LEVEL = 3


def _encode_tensor(name: str, tensor: torch.Tensor, compressor, index: str) -> tuple[dict, dict[str, bytes]]:
    import zstandard as zstd

    entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}
    if tensor.numel() > FAST_RANKING_ELEMENTS:
        compressor = zstd.ZstdCompressor(level=_FAST_LEVEL, write_checksum=False)
    raw, store = _raw(tensor)
    best = ({"encoding": "raw", "store": store}, {"dense": raw})
    best_size = len(compressor.compress(raw))
    if tensor.dtype != torch.float32 or tensor.numel() < 16:
        return {**entry, **best[0]}, best[1]
    flat = tensor.detach().cpu().contiguous().numpy().ravel()
    for desc, parts in _candidates(flat):
        if index != "auto" and desc["index"]["kind"] != index:
            continue
        size = sum(len(compressor.compress(b)) for b in parts.values())
        if size < best_size:
            best, best_size = ({"encoding": "coded", **desc}, parts), size
    return {**entry, **best[0]}, best[1]


def _compact_stage(stage: dict[str, Any]) -> dict[str, Any]:
    """The stage with its config reduced to non-default keys: on a model of ~5 kB the full configs
    would be a tenth of the file. Loading rebuilds the same config (defaults fill the rest)."""
    from slimkit.core import registry

    try:
        cls = registry.get(stage["technique"]).config_cls
        config = cls.from_dict(stage.get("config", {})).compact_dict()
    except Exception:  # unknown technique or config: keep it as recorded, load will report it
        return stage
    return {**stage, "config": config}


def write_packed(model: nn.Module, path: str | Path, *, index: str = "auto", level: int = 19) -> dict[str, Any]:
    """Write `model` as a `.slim` file (lossless for the values it holds); returns the bytes of
    every part: {"header", "index", "values", "codebook", "dense", "total", "path"}."""
    import zstandard as zstd

    from slimkit.core.artifact import dedup_state_dict

    state = get_state(model)
    if state["source"] is None:
        raise ModelError(f"cannot pack {type(model).__name__}: slimkit does not know how to rebuild its "
                         "architecture; save it once with slimkit.save(model, path, factory='pkg.module:fn')")
    compressor = zstd.ZstdCompressor(level=level, write_checksum=False)
    buffers: dict[str, bytearray] = {s: bytearray() for s in STREAMS}
    tensors = []
    for name, tensor in dedup_state_dict(model).items():
        entry, parts = _encode_tensor(name, tensor, compressor, index)
        entry["parts"] = {}
        for stream, data in parts.items():
            entry["parts"][stream] = [len(buffers[stream]), len(data)]
            buffers[stream] += data
        tensors.append(entry)
    streams, blobs = {}, []
    for s in STREAMS:
        blob = compressor.compress(bytes(buffers[s])) if buffers[s] else b""
        streams[s] = [len(blob), len(buffers[s]), zlib.crc32(blob)]
        blobs.append(blob)
    manifest = {"format": FORMAT, "slimkit_version": slimkit.__version__, "torch_version": torch.__version__,
                "source": state["source"], "stages": [_compact_stage(s) for s in state["stages"]]}
    header_compressor = zstd.ZstdCompressor(level=level, write_checksum=False, write_dict_id=False,
                                            dict_data=_header_dictionary(VERSION))
    header = header_compressor.compress(json.dumps({"manifest": manifest, "streams": streams, "tensors": tensors},
                                                   separators=(",", ":")).encode())
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(_PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header)))
            fh.write(header)
            for blob in blobs:
                fh.write(blob)
    sizes = {"header": _PREFIX.size + len(header), **{s: streams[s][0] for s in STREAMS}}
    sizes["total"] = path.stat().st_size
    assert sizes["total"] == sum(v for k, v in sizes.items() if k != "total")
    sizes["path"] = str(path)
    return sizes


# -- reading -----------------------------------------------------------------------------------
def _read_parts(path: Path) -> tuple[dict, dict[str, bytes]]:
    import zstandard as zstd

    data = path.read_bytes()
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise ArtifactError(f"{path} is not a slimkit .slim file (bad magic bytes)")
    _, version, header_len, header_crc = _PREFIX.unpack_from(data)
    if version not in READS:
        raise ArtifactError(f"{path}: .slim version {version} is not supported (this slimkit reads "
                            f"{', '.join(map(str, READS))})")
    header = data[_PREFIX.size:_PREFIX.size + header_len]
    if len(header) != header_len or zlib.crc32(header) != header_crc:
        raise ArtifactError(f"{path}: corrupt .slim file (header checksum mismatch or truncated header)")
    dctx = zstd.ZstdDecompressor()
    try:
        meta = json.loads(zstd.ZstdDecompressor(dict_data=_header_dictionary(version))
                          .decompress(header, max_output_size=64 << 20))
        streams_meta = meta["streams"]
    except Exception as err:
        raise ArtifactError(f"{path}: corrupt .slim header ({type(err).__name__}: {err})") from None
    offset = _PREFIX.size + header_len
    streams = {}
    for s in STREAMS:
        comp_len, raw_len, crc = streams_meta[s]
        blob = data[offset:offset + comp_len]
        offset += comp_len
        if len(blob) != comp_len or zlib.crc32(blob) != crc:
            raise ArtifactError(f"{path}: corrupt .slim file (stream {s!r} checksum mismatch or truncated)")
        try:
            streams[s] = dctx.decompress(blob, max_output_size=raw_len) if comp_len else b""
        except Exception as err:
            raise ArtifactError(f"{path}: corrupt .slim stream {s!r} ({err})") from None
        if len(streams[s]) != raw_len:
            raise ArtifactError(f"{path}: corrupt .slim stream {s!r} ({len(streams[s])} bytes, expected {raw_len})")
    if offset != len(data):
        raise ArtifactError(f"{path}: {len(data) - offset} unexpected trailing bytes after the last stream")
    return meta, streams


def _decode_tensor(entry: dict, streams: dict[str, bytes]) -> torch.Tensor:
    def part(stream: str) -> bytes:
        start, length = entry["parts"][stream]
        return streams[stream][start:start + length]

    shape, dtype = entry["shape"], getattr(torch, entry["dtype"])
    numel = int(np.prod(shape)) if shape else 1
    if entry["encoding"] == "raw":
        store = getattr(torch, entry["store"])
        t = torch.frombuffer(bytearray(part("dense")), dtype=store) if numel else torch.empty(0, dtype=store)
        return t.to(dtype).reshape(shape)
    idx, val = entry["index"], entry["values"]
    if val["kind"] == "codes":
        cb = val["codebook"]
        codebook = np.frombuffer(part("codebook"), dtype=np.dtype(cb["dtype"])).astype(np.float32)
        if len(codebook) != cb["size"]:
            raise ValueError("codebook size mismatch")
        codes = _codes_from(part("values"), val["bits"], val["layout"], val["count"])
        if len(codes) and codes.max() >= len(codebook):
            raise ValueError("value code outside the codebook")
        values = codebook[codes]
    else:
        values = np.frombuffer(part("values"), dtype=np.dtype(val["kind"])).astype(np.float32)
        if len(values) != val["count"]:
            raise ValueError("value count mismatch")
    flat = np.zeros(numel, dtype=np.float32)
    if idx["kind"] == "dense":
        if len(values) != numel:
            raise ValueError("dense code count mismatch")
        flat[:] = values
    elif idx["kind"] == "bitmask":
        mask = np.unpackbits(np.frombuffer(part("index"), dtype=np.uint8))
        if len(mask) != math.ceil(numel / 8) * 8 or mask[numel:].any():
            raise ValueError("bitmask length mismatch")
        mask = mask[:numel].astype(bool)
        if int(mask.sum()) != len(values):
            raise ValueError("bitmask and value count disagree")
        flat[mask] = values
    else:
        stored = _codes_from(part("index"), idx["bits"], idx["layout"], idx["count"])
        positions = positions_from_relative(stored)
        if len(positions) != len(values) or (len(positions) and positions[-1] >= numel):
            raise ValueError("relative index points outside the tensor")
        flat[positions] = values
    return torch.from_numpy(flat).reshape(shape).to(dtype)


def read_packed(path: str | Path, *, trust_factory: bool = False) -> nn.Module:
    """Rebuild the model stored in a `.slim` file (architecture from its manifest, then weights).
    `trust_factory` as in `slimkit.load`: a builder the file names is called only when trusted."""
    from slimkit.core.artifact import load_weights, rebuild
    from slimkit.errors import SlimkitError, UntrustedFactoryError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model file not found: {path}")
    meta, streams = _read_parts(path)
    try:
        tensors = {e["name"]: _decode_tensor(e, streams) for e in meta["tensors"]}
    except Exception as err:
        raise ArtifactError(f"{path}: corrupt .slim tensor data ({type(err).__name__}: {err})") from None
    try:
        model = rebuild(meta["manifest"], trust_factory=trust_factory)
    except UntrustedFactoryError as err:
        raise UntrustedFactoryError(f"{path}: {err}") from None
    except SlimkitError as err:
        raise ArtifactError(f"{path}: cannot rebuild the model: {err}") from None
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: corrupt .slim manifest ({err})") from None
    load_weights(model, tensors, origin=str(path))
    return model.eval()


def packed_info(path: str | Path) -> dict[str, Any]:
    """Bytes of every part of a `.slim` file and how each tensor is encoded (no model is built)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model file not found: {path}")
    meta, _ = _read_parts(path)
    data = path.read_bytes()
    _, _, header_len, _ = _PREFIX.unpack_from(data)
    sizes = {"header": _PREFIX.size + header_len, **{s: meta["streams"][s][0] for s in STREAMS}, "total": len(data)}
    layers = {}
    for e in meta["tensors"]:
        if e["encoding"] == "raw":
            layers[e["name"]] = f"raw {e['store']}"
        else:
            idx, val = e["index"], e["values"]
            ind = idx["kind"] + (f" {idx['bits']}-bit" if "bits" in idx else "")
            v = f"{val['bits']}-bit codes ({val['codebook']['size']} shared values)" if val["kind"] == "codes" else val["kind"]
            layers[e["name"]] = f"{ind} index, {v}"
    return {"bytes": sizes, "tensors": layers, "manifest": meta["manifest"]}

"""What the CPU can do for int8: the instruction-set features that decide how ONNX Runtime's integer
kernels accumulate (and so whether a full 8-bit weight grid is safe on this machine)."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# flags that matter for int8 GEMM/conv kernels (Linux /proc/cpuinfo names)
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddot", "i8mm")


@lru_cache(maxsize=1)
def cpu_isa() -> dict:
    """{"machine", "flags": the INT8_FLAGS present, "int8_accumulation": how u8 x s8 products are summed}."""
    machine = platform.machine().lower()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the architecture alone
        pass
    present = [f for f in INT8_FLAGS if f in flags]
    if machine in ("arm64", "aarch64"):
        accumulation = "int32 (ARM64: no saturating pair sums)"
    elif {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        accumulation = "int32 (VNNI/AMX: no saturating pair sums)"
    elif "avx2" in flags:
        accumulation = "int16 pairs (AVX2 VPMADDUBSW: u8 x s8 pair sums saturate above 32767)"
    else:
        accumulation = "unknown"
    return {"machine": machine, "flags": present, "int8_accumulation": accumulation}

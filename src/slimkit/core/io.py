"""Atomic file writing: write to a temp file in the target folder, fsync, then rename.

Under torchrun, the outputs a command declares up front (`output_file`, `output_dir`) are written by
rank 0 alone; the other ranks write into a private temporary file that is thrown away and wait until
rank 0's file is in place. Files a rank writes elsewhere (its own temporary folders) are its own.
"""
from __future__ import annotations


import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from slimkit.errors import ArtifactError


_DECLARED: set[Path] = set()  # outputs of this command (rank 0 writes them under torchrun)


def output_dir(path: str | Path) -> Path:
    """Create the folder `path` (and its parents), or raise ArtifactError naming what is in the way."""
    path = _make_dir(path)
    _DECLARED.add(path.resolve())
    return path


def _make_dir(path: str | Path) -> Path:
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ArtifactError(f"cannot write to {path}: {blocker} is a file, not a folder; choose another output path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(f"cannot create the folder {path}: {err.strerror or err}") from None
    return path


def output_file(path: str | Path) -> Path:
    """Check that a file can be written at `path` (its folder is created); call it before long work."""
    path = _check_file(path)
    _DECLARED.add(path.resolve())
    return path


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a folder; give a file name")
    _make_dir(path.parent)
    return path


def _rank0_writes(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved == d or d in resolved.parents for d in _DECLARED)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success it is renamed onto `path`.

    On error (or Ctrl-C) the temporary file is removed and `path` keeps whatever it had before.
    """
    from slimkit.core import distributed

    path = _check_file(path)
    world = distributed.world()
    if world.active and _rank0_writes(path):
        if world.main:
            with _atomic(path) as tmp:
                yield tmp
        else:  # the same work, into a file nobody keeps; rank 0's file is the output
            with tempfile.TemporaryDirectory() as scratch:
                yield Path(scratch) / path.name
        distributed.barrier()  # every rank goes on once rank 0's file is in place
        return
    with _atomic(path) as tmp:
        yield tmp


@contextmanager
def _atomic(path: Path):
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise ArtifactError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


@contextmanager
def quiet_native_logs():
    """Native libraries (LiteRT's converter, ExecuTorch's runtime) log to file descriptor 2 whatever Python
    asks; send what they write meanwhile to a temp file."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)

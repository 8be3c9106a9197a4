"""Atomic file writing: write to a temp file in the target folder, fsync, then rename."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from slimkit.errors import ArtifactError


def output_dir(path: str | Path) -> Path:
    """Create the folder `path` (and its parents), or raise ArtifactError naming what is in the way."""
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
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a folder; give a file name")
    output_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success it is renamed onto `path`.

    On error (or Ctrl-C) the temporary file is removed and `path` keeps whatever it had before.
    """
    path = output_file(path)
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

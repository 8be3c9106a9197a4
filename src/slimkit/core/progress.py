"""Progress bars shared by every long-running step (rich). Set SLIMKIT_PROGRESS=0 to silence."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def enabled() -> bool:
    return os.environ.get("SLIMKIT_PROGRESS", "1") != "0"


@contextmanager
def progress_bar(description: str, total: int | None):
    """Context manager yielding `advance(n=1, **fields)`; shows `description` and live fields."""
    if not enabled():
        yield lambda n=1, **fields: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=not sys.stderr.isatty(), disable=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task_id, advance=n, info=info)

        yield advance

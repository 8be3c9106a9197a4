"""Progress shared by every long-running step.

On a terminal: a rich progress bar. When stderr is not a terminal (a log file, CI): plain lines
`description: 40/120 (33%), elapsed 12s, ETA 24s, epoch=2 loss=0.31`, at most one every
`SLIMKIT_PROGRESS_INTERVAL` seconds (default 10) plus one when the step ends, never blank lines.
`SLIMKIT_PROGRESS=0` silences both.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # a log gets whole lines, not lines cut at 80 columns


def enabled() -> bool:
    """Off with SLIMKIT_PROGRESS=0, and on every torchrun rank but 0 (rank 0 shows the run's progress)."""
    return os.environ.get("SLIMKIT_PROGRESS", "1") != "0" and os.environ.get("RANK", "0") in ("", "0")


def mode() -> str:
    """'off' (SLIMKIT_PROGRESS=0), 'bar' (stderr is a terminal) or 'lines' (a log file, a pipe)."""
    if not enabled():
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fields(fields: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


class _Lines:
    """Plain periodic progress lines for logs: no cursor control, no blank lines."""

    def __init__(self, description: str, total: int | None, interval: float):
        self.description, self.total, self.interval = description, total, interval
        self.done, self.fields = 0, {}
        self.start = self.last = time.monotonic()

    def line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.description}:"]
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%),")
        elif self.done:
            parts.append(f"{self.done},")
        if final:
            parts.append(f"done in {format_seconds(elapsed)}")
        else:
            parts.append(f"elapsed {format_seconds(elapsed)}")
            if self.total and self.done:
                parts[-1] += f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        text = " ".join(parts)
        info = _fields(self.fields)
        return f"{text}, {info}" if info else text

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)


@contextmanager
def progress_bar(description: str, total: int | None):
    """Context manager yielding `advance(n=1, **fields)`; shows `description` and live fields.
    A `total` of 0 shows nothing (a caller's way to run quietly)."""
    how = mode() if total != 0 else "off"
    if how == "off":
        yield lambda n=1, **fields: None
        return
    if how == "lines":
        try:
            interval = float(os.environ.get("SLIMKIT_PROGRESS_INTERVAL", "10"))
        except ValueError:
            interval = 10.0
        lines = _Lines(description, total, interval)
        yield lines.advance
        print(lines.line(final=True), file=sys.stderr, flush=True)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            progress.update(task_id, advance=n, info=_fields(fields))

        yield advance

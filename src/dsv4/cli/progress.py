"""The one progress bar of the command line: `progress_bar(label, console)` yields a `progress(done, total)`
callback for the long steps (building a synthetic model, loading weights, converting, exporting).

The bar is drawn on stderr from the callback's first call, so a step that reports nothing (a
memory-mapped load) or fails early shows no empty bar; `units="bytes"` shows sizes and time left,
`units="count"` a percentage.  Output that is not a terminal gets no bar (nor the blank line a
finished bar leaves)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


@contextmanager
def progress_bar(label: str, console, units: str = "bytes", transient: bool = False):
    extra = ((DownloadColumn(), TimeRemainingColumn()) if units == "bytes"
             else (TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn()))
    bar = Progress(TextColumn(label), BarColumn(), *extra, console=console, transient=transient,
                   disable=not console.is_terminal)
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield progress
    finally:
        if task is not None:
            bar.stop()

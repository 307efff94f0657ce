"""The rich consoles of the command line: wrapped to the width of a terminal, never wrapped off one.

Off a terminal (a pipe, a file, a test runner) rich would wrap every line at 80 columns, cutting an
error message, or the copy-paste command printed after `dsv4 convert`/`export`, in two; there the
width is unlimited, so each line stays whole (tables take the width their cells need)."""

from __future__ import annotations

from rich.console import Console

UNLIMITED = 1 << 20          # columns: no line or table cell is ever this long


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr), created when a command runs (it looks at that stream then)."""
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out.width = UNLIMITED
    return out

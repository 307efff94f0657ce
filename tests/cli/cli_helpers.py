"""Assertions shared by the CLI tests."""

import json

from dsv4.cli.resolve import CPU_PREFERENCE, backend_available

AUTO_CPU = next(b for b in CPU_PREFERENCE if backend_available(b))     # what --backend auto picks here (no GPU)


def error_line(result) -> str:
    """The single stderr line of a failed command (asserting there is exactly one and no traceback)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def json_out(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)

"""`python -m dsv4 ...` runs the `dsv4` command (for environments whose scripts directory is not on PATH)."""

from dsv4.cli.main import app

app(prog_name="dsv4")

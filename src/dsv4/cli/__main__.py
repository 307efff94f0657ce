"""`python -m dsv4.cli` runs the `dsv4` command."""

from .main import app

app(prog_name="dsv4")

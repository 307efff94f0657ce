"""CLI test helpers: run `dsv4 …` in-process with typer's runner (stdout and stderr kept apart)."""

import pytest
from typer.testing import CliRunner

from dsv4.cli.main import app


@pytest.fixture
def dsv4_cli():
    runner = CliRunner()

    def run(*args, input=None, env=None):
        return runner.invoke(app, [str(a) for a in args], input=input, env=env)
    return run


@pytest.fixture
def model_args(tiny_dir):
    """Common flags: the tiny checkpoint with a small context (fast on the reference backend)."""
    return ["--model", str(tiny_dir), "--context", "256"]


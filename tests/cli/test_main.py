"""The `dsv4` command itself: -h/--help, --version, flags shown as flags, and output that is not wrapped
when it does not go to a terminal."""

import pytest
from .cli_helpers import error_line

import dsv4
from dsv4.cli.console import console
from dsv4.cli.main import app

COMMANDS = ("chat", "generate", "info", "parity", "bench", "convert", "export", "serve")


def test_version(dsv4_cli):
    r = dsv4_cli("--version")
    assert r.exit_code == 0 and r.stdout == f"dsv4 {dsv4.__version__}\n"


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dsv4", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"dsv4 {dsv4.__version__}\n"


@pytest.mark.parametrize("command", [(), *((c,) for c in COMMANDS)])
def test_dash_h_is_help_and_flags_take_no_value(dsv4_cli, command):
    long, short = dsv4_cli(*command, "--help"), dsv4_cli(*command, "-h")
    assert long.exit_code == short.exit_code == 0 and long.stdout == short.stdout
    assert "Usage: dsv4" in long.stdout and "-h" in long.stdout
    assert "<bool>" not in long.stdout                     # `--json`, not `--json <bool>`


def test_every_flag_is_shown_without_a_value(dsv4_cli):
    """The flags the commands declare, found from the app itself (so a new one is covered too)."""
    import typer.main
    group = typer.main.get_command(app)
    flags = {(name, opt) for name, cmd in group.commands.items() for p in cmd.params if getattr(p, "is_flag", False)
             for opt in p.opts}
    assert ("generate", "--json") in flags and ("chat", "--force") in flags
    for name, opt in flags:
        line = next(ln for ln in dsv4_cli(name, "--help").stdout.splitlines() if f" {opt} " in ln)
        shown = line.split(opt, 1)[1].strip().split("  ")[0]    # what follows the flag: its help text
        assert not shown.startswith("<"), line


def test_a_flag_given_a_value_is_one_line(dsv4_cli, model_args):
    r = dsv4_cli("generate", "hello", *model_args, "--json", "true")
    assert r.exit_code == 2 and error_line(r) == "error: Got unexpected extra argument(s) (true)"


def test_bare_command_prints_help(dsv4_cli):
    r = dsv4_cli()
    assert r.exit_code == 0 and "Commands" in r.stdout


@pytest.mark.parametrize("stderr", [False, True])
def test_no_wrapping_off_a_terminal(capsys, stderr):
    """Piped or redirected output keeps every line whole (rich would wrap at 80 columns)."""
    line = "error: " + " ".join(f"word{i}" for i in range(60))
    console(stderr=stderr).print(line)
    out, err = capsys.readouterr()
    assert (err if stderr else out) == line + "\n"


def test_info_is_not_wrapped_in_a_pipe(dsv4_cli, tiny_dir, tmp_path):
    """`dsv4 info` piped: the header naming a long model path stays on one line (it was cut at 80)."""
    long = tmp_path / ("a-checkpoint-directory-with-a-name-long-enough-to-pass-eighty-columns-" * 2)
    long.symlink_to(tiny_dir)
    r = dsv4_cli("info", "--model", str(long))
    assert r.exit_code == 0
    assert any(long.name in line for line in r.stdout.splitlines())

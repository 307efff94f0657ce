"""The `dsv4` command: registers the subcommands, each in its own module.

Heavy modules (backends, the server, exporters) are imported inside the commands that need them, so
`dsv4 --help` and `dsv4 info` start fast and a missing optional dependency only affects its command.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from .bench import bench
from .chat import chat
from .convert import convert, export
from .errors import EXIT_CODES_HELP, OneLineErrors
from .generate import generate
from .info import info
from .options import Command, FlagHelp
from .parallel import follow_if_launched
from .parity import parity
from .serve_command import serve


class Group(FlagHelp, OneLineErrors):
    """The `dsv4` group: one-line errors (`errors`), flags shown as flags (`options.FlagHelp`)."""


app = typer.Typer(cls=Group, name="dsv4", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, epilog=EXIT_CODES_HELP,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="DeepSeek V4 inference: chat, generate, serve, inspect, check and convert models. "
                       "Without --model every command uses a small built-in demo model.")


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"dsv4 {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """Options of `dsv4` itself (the subcommands have their own)."""
    follow_if_launched()          # under torchrun / mlx.launch, ranks other than 0 follow rank 0


for command in (chat, generate, info, parity, bench, convert, export, serve):
    app.command(cls=Command)(command)

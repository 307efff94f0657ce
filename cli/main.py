"""The `dsv4` command: registers the subcommands, each in its own module.

Heavy modules (backends, the server, exporters) are imported inside the commands that need them, so
`dsv4 --help` and `dsv4 info` start fast and a missing optional dependency only affects its command.
"""

from __future__ import annotations

import typer

from .bench import bench
from .chat import chat
from .convert import convert, export
from .errors import EXIT_CODES_HELP, OneLineErrors
from .generate import generate
from .info import info
from .parity import parity
from .serve_command import serve

app = typer.Typer(cls=OneLineErrors, name="dsv4", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, epilog=EXIT_CODES_HELP,
                  help="DeepSeek V4 inference: chat, generate, serve, inspect, check and convert models. "
                       "Without --model every command uses a small built-in demo model.")

app.command()(chat)
app.command()(generate)
app.command()(info)
app.command()(parity)
app.command()(bench)
app.command()(convert)
app.command()(export)
app.command()(serve)

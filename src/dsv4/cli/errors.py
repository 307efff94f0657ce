"""User-facing errors: one readable line on stderr and a meaningful exit code, never a traceback.

Why one place: a command may fail in click's argument parsing, in model resolution, in a backend import
or in the encoder; each of those raises its own exception type.  `OneLineErrors` (the typer group class
of the `dsv4` app) catches them at the top, so every command gets the same behaviour without wrapping
its body.  Exceptions that are not listed here are bugs and keep their traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperGroup

try:                                     # typer ≥ 0.20 vendors its own copy of click
    from typer._click import exceptions as _typer_click
except ImportError:
    _typer_click = click.exceptions
# Argument-parsing errors of whichever click typer runs on; `NoArgsIsHelp` is a bare `dsv4` (help, exit 0).
_USAGE_ERRORS = tuple({click.exceptions.ClickException, _typer_click.ClickException})
_NO_ARGS = tuple({m.NoArgsIsHelpError for m in (click.exceptions, _typer_click) if hasattr(m, "NoArgsIsHelpError")})
_ABORT = tuple({click.exceptions.Abort, typer.Abort})

# Exit codes (documented in `dsv4 --help` epilog and the README).
EXIT_FAILURE = 1        # a check failed (parity bound) or generation failed
EXIT_USAGE = 2          # bad flag value or missing argument (click's convention), e.g. a --port in use
EXIT_MODEL = 3          # model directory missing or not a usable V4 checkpoint
EXIT_BACKEND = 4        # unknown or not installed backend
EXIT_MEMORY = 5         # the model will not fit in memory (override with --force)
EXIT_CONTEXT = 6        # the prompt does not fit the context
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell convention)

EXIT_CODES_HELP = ("Exit codes: 0 ok, 1 check failed, 2 bad usage, 3 model not found/invalid, "
                   "4 backend unavailable, 5 not enough memory (--force), 6 prompt exceeds context, "
                   "130 interrupted.")


class CliError(Exception):
    """An error the user can fix; `message` is the whole story in one line."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.message, self.exit_code = message, code


def _known_errors() -> list[tuple[type, int]]:
    """Library exceptions that describe a user mistake, with their exit codes (most specific first)."""
    from ..portable.checkpoint import CheckpointError
    from ..portable.config import ConfigError
    from ..portable.encoding import EncodingError
    from ..portable.encoding.tokenizer import TokenizerError
    from ..portable.prompt_store import PromptCacheError
    from ..portable.runtime import BackendError, ContextError, NonFiniteError
    from ..portable.tiny import CacheError
    return [(ContextError, EXIT_CONTEXT), (BackendError, EXIT_BACKEND), (ConfigError, EXIT_MODEL),
            (CheckpointError, EXIT_MODEL), (TokenizerError, EXIT_MODEL), (NonFiniteError, EXIT_MODEL),
            (CacheError, EXIT_MODEL), (FileNotFoundError, EXIT_MODEL), (EncodingError, EXIT_USAGE),
            (PromptCacheError, EXIT_USAGE)]


SHOWN_PROBLEMS = 3      # problems of a multi-line error (a checkpoint's) kept on its one line


def one_line(text: str) -> str:
    """A message as one line.  A multi-line one is a headline followed by one problem per line (a
    `CheckpointError`): the headline keeps the first SHOWN_PROBLEMS problems and says how many it left out."""
    head, *problems = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
    if not problems:
        return head
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return f"{head} {'; '.join(problems[:SHOWN_PROBLEMS])}{more}"


def as_cli_error(exc: BaseException) -> CliError | None:
    """The one-line error for a known library exception, or None for anything else (a bug)."""
    if isinstance(exc, CliError):
        return exc
    for kind, code in _known_errors():
        if isinstance(exc, kind):
            text = str(exc.args[0]) if isinstance(exc, OSError) and len(exc.args) == 1 else str(exc)
            return CliError(one_line(text) or kind.__name__, code)
    return None


def print_error(message: str) -> None:
    click.echo(f"error: {message}", err=True)


class OneLineErrors(TyperGroup):
    """Typer group whose `main` turns usage errors and known exceptions into `error: …` + exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS as e:
            click.echo(e.ctx.get_help())
            rv = 0
        except _USAGE_ERRORS as e:
            print_error((e.format_message().splitlines() or ["bad usage"])[0])
            rv = e.exit_code
        except (*_ABORT, KeyboardInterrupt):
            print_error("interrupted")
            rv = EXIT_INTERRUPTED
        except Exception as e:
            err = as_cli_error(e)
            if err is None:
                raise
            print_error(err.message)
            rv = err.exit_code
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

"""`dsv4 serve`: the command-line face of the HTTP server (`dsv4.cli.serve.serve`).

The server and its dependencies (fastapi, uvicorn) are imported only when the command runs, so the
rest of the CLI works without the `serve` extra; a missing one is a one-line error.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated, Optional

import typer

from . import options as opt
from .errors import EXIT_BACKEND, EXIT_USAGE, CliError


def serve(
    model: opt.Model = None, backend: opt.Backend = "auto", dtype: opt.Dtype = "auto",
    context: opt.Context = None, force: opt.Force = False,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DSV4_API_KEY",
                                                   help="Require this bearer token (env DSV4_API_KEY).")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting beyond this get HTTP 429.")] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Sequences decoded together.")] = 8,
    served_model_name: Annotated[Optional[str], typer.Option(
        "--served-model-name", help="Model name clients use (default: the directory or preset name).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug|info|warning|error.")] = "info",
):
    """Serve the model over HTTP (OpenAI- and Anthropic-compatible APIs)."""
    if not 0 < port < 65536:
        raise CliError(f"--port must be in 1..65535, got {port}", EXIT_USAGE)
    opt.check_positive("--max-queue", max_queue)
    opt.check_positive("--max-batch", max_batch)
    try:
        server = importlib.import_module("dsv4.cli.serve")
    except ImportError as e:
        raise CliError(f"the server needs the serve extra ({e.name or e} is missing): "
                       f"pip install 'dsv4[serve]'", EXIT_BACKEND) from None
    given = dict(model=model, backend=backend, host=host, port=port, api_key=api_key, max_queue=max_queue,
                 context=context, dtype=dtype, force=force, max_batch=max_batch,
                 served_model_name=served_model_name, log_level=log_level)
    accepted = inspect.signature(server.serve).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    server.serve(**{k: v for k, v in given.items() if takes_all or k in accepted})

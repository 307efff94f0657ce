"""`dsv4 serve`: the command-line face of the HTTP server (`dsv4.cli.serve.serve`).

The server and its dependencies (fastapi, uvicorn) are imported only when the command runs, so the
rest of the CLI works without the `serve` extra; a missing one is a one-line error (exit 4) naming the
command that installs it.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

from ..portable.install import install_command
from . import options as opt
from .errors import EXIT_BACKEND, EXIT_USAGE, CliError

LOG_LEVELS = ("debug", "info", "warning", "error")


def _comma_list(value: str | None, flag: str, what: str) -> tuple | None:
    """The entries of a comma-separated option (None when it is not given); one with none is refused."""
    if value is None:
        return None
    entries = tuple(e.strip() for e in value.split(",") if e.strip())
    if not entries:
        raise CliError(f"{flag} needs at least one {what} (or * for any)", EXIT_USAGE)
    return entries


def serve(
    model: opt.Model = None, backend: opt.Backend = "auto", dtype: opt.Dtype = "auto",
    context: opt.Context = None, force: opt.Force = False, parallel: opt.Parallel = None, threads: opt.Threads = None,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DSV4_API_KEY",
                                                   help="Require this bearer token (env DSV4_API_KEY).")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting beyond this get HTTP 429.")] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Sequences decoded together.")] = 8,
    served_model_name: Annotated[Optional[str], typer.Option(
        "--served-model-name", help="Model name clients use (default: the directory or preset name).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help=f"{'|'.join(LOG_LEVELS)}.")] = "info",
    max_body_mb: Annotated[Optional[float], typer.Option(
        "--max-body-mb", help="Largest request body in MB (default: 16 bytes per token of context, ≥ 4).")] = None,
    read_timeout: Annotated[float, typer.Option(
        "--read-timeout", help="Seconds a client has to send its request headers, and again its body.")] = 20.0,
    allowed_hosts: Annotated[Optional[str], typer.Option(
        "--allowed-hosts", help="Comma-separated Host names to answer, * for any (default: the names "
                                "--host is reached by; any for 0.0.0.0).")] = None,
    default_mode: Annotated[str, typer.Option(
        "--default-mode", help="Answer OpenAI requests that do not say: chat (no reasoning), thinking or max. "
                               "Anthropic requests think only when they ask.")] = "chat",
    allowed_origins: Annotated[Optional[str], typer.Option(
        "--allowed-origins", help="Comma-separated web origins granted CORS (https://app.example), * for "
                                  "any (default: none).")] = None,
    prompt_cache_dir: Annotated[Optional[str], typer.Option(
        "--prompt-cache-dir", help="Also keep prompt states in this directory, so they survive a restart "
                                   "(default: in memory only).")] = None,
    prompt_cache_gb: opt.PromptCacheGB = 8.0, draft_tokens: opt.DraftTokens = None,
):
    """Serve the model over HTTP (OpenAI- and Anthropic-compatible APIs)."""
    if not 0 < port < 65536:
        raise CliError(f"--port must be in 1..65535, got {port}", EXIT_USAGE)
    opt.check_positive("--max-queue", max_queue)
    opt.check_positive("--max-batch", max_batch)
    for flag, value in (("--max-body-mb", max_body_mb), ("--read-timeout", read_timeout),
                        ("--prompt-cache-gb", prompt_cache_gb)):
        if value is not None:
            opt.check_above_zero(flag, value)
    hosts = _comma_list(allowed_hosts, "--allowed-hosts", "name")
    origins = _comma_list(allowed_origins, "--allowed-origins", "origin") or ()
    opt.check_mode(default_mode, "--default-mode")
    opt.check_draft_tokens(draft_tokens)
    if log_level not in LOG_LEVELS:
        raise CliError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}", EXIT_USAGE)
    try:
        server = importlib.import_module("dsv4.cli.serve")
    except ImportError as e:
        raise CliError(f"the server needs the serve extra ({e.name or e} is missing): "
                       f"{install_command('serve')}", EXIT_BACKEND) from None
    server.serve(model=model, backend=backend, host=host, port=port, api_key=api_key, max_queue=max_queue,
                 context=context, dtype=dtype, force=force, parallel=parallel, threads=threads, max_batch=max_batch,
                 served_model_name=served_model_name, log_level=log_level, max_body_mb=max_body_mb,
                 read_timeout=read_timeout, allowed_hosts=hosts, default_mode=default_mode,
                 allowed_origins=origins, prompt_cache_dir=prompt_cache_dir, prompt_cache_gb=prompt_cache_gb,
                 draft_tokens=draft_tokens)

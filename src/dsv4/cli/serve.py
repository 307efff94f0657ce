"""`dsv4 serve`: load a model and serve the OpenAI and Anthropic APIs with uvicorn.

This module imports the serve extra (uvicorn, fastapi) at the top, so importing it is the check that the
extra is installed (`serve_command` turns a failure into one line naming the install command).  The CLI
command is a thin wrapper around `serve()`; model resolution (presets, `auto` backend, memory check) is
`cli.resolve.load_model`, shared with every other command.  `serve()` takes the listening port before it
loads the model, so a busy port fails in a moment instead of after the load.  Tests and embedders use
`dsv4.cli.server.build_app(model, ...)` directly with a model they loaded themselves.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import uvicorn

from .errors import EXIT_USAGE, CliError
from .options import check_draft_tokens, prompt_store
from .resolve import DEFAULT_MODEL, load_model
from .server import build_app
from .server.connection import uvicorn_config
from .server.intake import hosts_for_bind

log = logging.getLogger("dsv4.serve")


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds its own (IPv6 for a host with ':', SO_REUSEADDR), for
    uvicorn to listen on; a port that is taken or not allowed is a CliError.  The protocol is named
    (IPPROTO_TCP, as getaddrinfo names it for uvicorn): asyncio disables Nagle's algorithm only on
    connections of such a socket, and without that every response waited ~40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = e.strerror or str(e)
        raise CliError(f"cannot listen on {host}:{port}: {why.lower()}; choose another --port or --host",
                       EXIT_USAGE) from None
    return sock


def serve(model: str | None = None, backend: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_queue: int = 64, context: int | None = None, max_batch: int = 8,
          served_model_name: str | None = None, dtype: str = "auto", prefill_chunk: int = 256,
          cache_size: int = 8, force: bool = False, log_level: str = "info", max_body_mb: float | None = None,
          read_timeout: float = 20.0, allowed_hosts: tuple | None = None, default_mode: str = "chat",
          allowed_origins: tuple = (), prompt_cache_dir: str | None = None, prompt_cache_gb: float = 8.0,
          parallel: int | None = None, draft_tokens: int | None = None, threads: int | None = None) -> None:
    """Blocking: serve `model` (a checkpoint directory or a preset name; default demo) until interrupted.

    Clients address the model as `served_model_name` (default: the directory or preset name).  Request
    bodies above `max_body_mb` (default: scaled to the context) are refused; `allowed_hosts` (default:
    the names `host` is reached by, see `server.intake`) are the `Host` names answered.  OpenAI requests
    that say nothing about thinking get `default_mode`; `allowed_origins` are granted CORS.  The access
    log is the server's own (`server.metrics`: one line with tokens and rates), so uvicorn's is off.
    With `prompt_cache_dir`, prompt states are also saved there (at most `prompt_cache_gb` GB) and
    restored after a restart (`portable.prompt_store`)."""
    sock = listen_socket(host, port)
    try:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        loaded = load_model(model, backend=backend, dtype=dtype, context=context, force=force, parallel=parallel,
                            threads=threads)
        check_draft_tokens(draft_tokens, loaded)
        store = prompt_store(loaded, prompt_cache_dir, prompt_cache_gb)
        name = served_model_name or Path(str(model or DEFAULT_MODEL)).expanduser().name
        app = build_app(loaded, model_name=name, api_key=api_key, max_queue=max_queue, max_batch=max_batch,
                        prefill_chunk=prefill_chunk, cache_size=cache_size,
                        max_body=None if max_body_mb is None else round(max_body_mb * 1_000_000),
                        read_timeout=read_timeout,
                        allowed_hosts=allowed_hosts or hosts_for_bind(host), default_mode=default_mode,
                        allowed_origins=allowed_origins, prompt_store=store, draft_tokens=draft_tokens)
        shown = f"[{host}]" if ":" in host else host
        log.info("listening on http://%s:%d (Ctrl-C stops)", shown, port)   # uvicorn logs it only for its own socket
        uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level, access_log=False)).run(sockets=[sock])
    finally:
        sock.close()

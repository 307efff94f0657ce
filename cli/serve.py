"""`dsv4 serve`: load a model and serve the OpenAI and Anthropic APIs with uvicorn.

The CLI command is a thin wrapper around `serve()`; model resolution (presets, `auto` backend, memory
check) is `cli.resolve.load_model`, shared with every other command.  Tests and embedders use
`dsv4.cli.server.build_app(model, ...)` directly with a model they loaded themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .resolve import DEFAULT_MODEL, load_model


def serve(model: str | None = None, backend: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_queue: int = 64, context: int | None = None, max_batch: int = 8,
          served_model_name: str | None = None, dtype: str = "auto", prefill_chunk: int = 256,
          cache_size: int = 8, force: bool = False, log_level: str = "info") -> None:
    """Blocking: serve `model` (a checkpoint directory or a preset name; default demo) until interrupted.

    Clients address the model as `served_model_name` (default: the directory or preset name)."""
    try:
        import uvicorn

        from .server import build_app
    except ImportError as e:
        raise SystemExit(f"dsv4 serve needs the serve extra ({e.name} is missing): "
                         "pip install 'dsv4[serve]'") from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_model(model, backend=backend, dtype=dtype, context=context, force=force)
    name = served_model_name or Path(str(model or DEFAULT_MODEL)).expanduser().name
    app = build_app(loaded, model_name=name, api_key=api_key, max_queue=max_queue, max_batch=max_batch,
                    prefill_chunk=prefill_chunk, cache_size=cache_size)
    uvicorn.run(app, host=host, port=port, log_level=log_level)

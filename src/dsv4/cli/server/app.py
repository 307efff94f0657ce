"""The HTTP application: routing, API keys, error formatting, health.  No model code lives here.

`build_app(model, ...)` wraps a loaded model in an `Engine` (started and stopped with the app) and
mounts the OpenAI adapter (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and the Anthropic
adapter (`/v1/messages`, `/v1/messages/count_tokens`) behind `intake.Intake` (Host, content type, body
size and read deadline).  Every route runs inside `_guard`, which turns any failure into the error
format of that route's API family, logs it and keeps serving; an unexpected exception is logged with
its traceback and answered "internal error" only, never with its text.

Prompts are rendered and tokenized off the event loop.  Before the tokenizer runs, a prompt that cannot
fit the context is refused on a bound that needs no tokenizing: no token stands for more than
`max_token_bytes` bytes (the longest in the vocabulary; 128 for V4), and a byte-level BPE without a
normalizer (V4's) turns text into tokens whose bytes are exactly the text's UTF-8 bytes, so a text of
B bytes is at least ceil(B / max_token_bytes) tokens.  The bound never refuses a prompt that fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from dsv4.portable.encoding import Control, render_prompt

from . import anthropic_api, openai_api
from .engine import Engine
from .errors import APIError, error_response
from .generation import ClientGone
from .intake import LOOPBACK_NAMES, Intake, Limits, default_max_body

log = logging.getLogger("dsv4.serve")


class ServerState:
    """What the adapters share: the engine, the tokenizer and the served model's identity."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, context: int, effort_table: str,
                 api_key: str | None, limits: Limits):
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.context, self.effort_table = model_name, context, effort_table
        self.api_key, self.limits = api_key, limits
        self.created = int(time.time())
        self.max_token_bytes = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))

    def authorize(self, request: Request) -> None:
        """Accept the key as `Authorization: Bearer KEY` (OpenAI clients) or `x-api-key` (Anthropic)."""
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                           code="missing_api_key")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def check_model(self, name: str) -> str:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return name

    async def encode(self, encoder_input) -> list:
        """Prompt ids of a conversation, computed off the event loop; refused before tokenizing when it
        provably exceeds the context (module docstring)."""
        return await asyncio.to_thread(self._encode_messages, encoder_input)

    async def encode_text(self, text: str) -> list:
        """BOS + the ids of raw text (legacy completions), like `encode`."""
        return await asyncio.to_thread(self._encode_text, text)

    def _encode_messages(self, encoder_input) -> list:
        prompt = render_prompt(**encoder_input.as_kwargs())
        self._check_fits(sum(1 if isinstance(run, Control) else self._min_tokens(run) for run in prompt.runs()),
                         "messages")
        return self.tokenizer.encode_prompt(prompt)

    def _encode_text(self, text: str) -> list:
        self._check_fits(1 + self._min_tokens(text), "prompt")
        return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

    def _min_tokens(self, text: str) -> int:
        return -(-len(text.encode("utf-8")) // self.max_token_bytes)

    def _check_fits(self, min_tokens: int, param: str) -> None:
        if min_tokens >= self.context:
            raise APIError(400, f"the prompt has at least {min_tokens:,} tokens; this model's context is "
                                f"{self.context:,}", param=param, code="context_length_exceeded")

    def budget(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        """max_tokens checked against the context; absent means "up to the end of the context"."""
        room = self.context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {self.context}",
                           param="messages", code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + {param} ({max_tokens}) exceeds this model's "
                                f"context of {self.context} tokens", param=param, code="context_length_exceeded")
        return max_tokens


def _guard(state: ServerState, handler, auth: bool = True):
    """Run a route: authorize, call, and map every failure to the route's own error format."""

    async def route(request: Request):
        path = request.url.path
        try:
            if auth:
                state.authorize(request)
            return await handler(state, request)
        except APIError as e:
            log.info("%s %s -> %d: %s", request.method, path, e.status, e.message)
            return error_response(path, e)
        except ClientGone:
            log.info("%s %s: client disconnected; generation cancelled", request.method, path)
            return JSONResponse({}, status_code=499)
        except ValueError as e:   # the encoding layer's RequestError / EncodingError, sampler checks
            log.info("%s %s -> 400: %s", request.method, path, e)
            return error_response(path, APIError(400, str(e)))
        except Exception:
            log.exception("%s %s failed", request.method, path)
            return error_response(path, APIError(500, "internal error (the server log has the details)"))

    return route


def build_app(model, model_name: str = "demo", api_key: str | None = None, max_queue: int = 64,
              max_batch: int = 8, prefill_chunk: int = 256, cache_size: int = 8, max_body: int | None = None,
              read_timeout: float = 20.0, allowed_hosts=LOOPBACK_NAMES) -> FastAPI:
    """An ASGI app serving `model`; the scheduler starts with the app and stops with it.

    max_body: the largest request body in bytes (None: `intake.default_max_body` of the context);
    read_timeout: seconds a client has for its request headers, and again for its body (the header
    deadline needs the app served with `connection.uvicorn_config`); allowed_hosts: the `Host` names
    accepted ("*": any)."""
    engine = Engine(model, max_queue=max_queue, max_batch=max_batch, prefill_chunk=prefill_chunk,
                    cache_size=cache_size)
    limits = Limits(default_max_body(model.context) if max_body is None else max_body, read_timeout,
                    tuple(allowed_hosts))
    state = ServerState(engine, model.tokenizer, model_name, model.context,
                        getattr(model.config, "encoding", "2604"), api_key, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        log.info("serving %r (context %d, batching %s)", model_name, model.context, engine.batching)
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="dsv4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    async def health(state, request):
        return JSONResponse({"status": "ok", "model": state.model_name, **state.engine.stats()})

    app.add_api_route("/health", _guard(state, health, auth=False), methods=["GET"])
    routes = openai_api.ROUTES + anthropic_api.ROUTES
    for path, handler, methods in routes:
        app.add_api_route(path, _guard(state, handler), methods=methods)
    app.add_middleware(Intake, limits=limits, json_paths=[path for path, _, methods in routes if "POST" in methods])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail)))

    return app

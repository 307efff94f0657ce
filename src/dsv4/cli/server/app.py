"""The HTTP application: routing, API keys, error formatting, health.  No model code lives here.

`build_app(model, ...)` wraps a loaded model in an `Engine` (started and stopped with the app) and
mounts the OpenAI adapters (`/v1/chat/completions`, `/v1/completions`, `/v1/models`; `/v1/responses`)
and the Anthropic adapter (`/v1/messages`, `/v1/messages/count_tokens`) behind `intake.Intake` (Host,
content type, body size and read deadline).  Every route runs inside `_guard`, which turns any failure
into the error format of that route's API family, logs it and keeps serving; an unexpected exception is
logged with its traceback and answered "internal error" only, never with its text.

Prompts are rendered and tokenized off the event loop.  Before the tokenizer runs, a prompt that cannot
fit the context is refused on a bound that needs no tokenizing: no token stands for more than
`max_token_bytes` bytes (the longest in the vocabulary; 128 for V4), and a byte-level BPE without a
normalizer (V4's) turns text into tokens whose bytes are exactly the text's UTF-8 bytes, so a text of
B bytes is at least ceil(B / max_token_bytes) tokens.  The bound never refuses a prompt that fits.

Middleware, outermost first: `metrics.Accounting` (every request counted at `/metrics` and logged in one
line, refusals included), CORS for `allowed_origins` when there are any, then `intake.Intake`.

`GET /` is the chat page (`page/index.html`), served without a key: it holds no data, and the API calls
it makes carry the key the user types into it.  Its Content-Security-Policy allows scripts and styles
inline only and connections to this origin only, so the page can load nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from dsv4.portable.encoding import Control, from_openai, render_prompt
from dsv4.portable.engine import Engine, PrefixCache

from ..session import MODES
from . import anthropic_api, metrics, openai_api, responses_api, tokens_api
from .errors import APIError, error_response
from .generation import ClientGone
from .intake import LOOPBACK_NAMES, Intake, Limits, default_max_body

log = logging.getLogger("dsv4.serve")

PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                "Cache-Control": "no-cache"}


class ServerState:
    """What the adapters share: the engine, the tokenizer and the served model's identity."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, context: int, effort_table: str,
                 api_key: str | None, limits: Limits, default_mode: str = "chat"):
        if default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {', '.join(MODES)}, got {default_mode!r}")
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.context, self.effort_table = model_name, context, effort_table
        self.api_key, self.limits, self.default_mode = api_key, limits, default_mode
        self.metrics = metrics.Metrics(engine.stats)
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

    def openai_input(self, data: dict):
        """Encoder input of an OpenAI request body; one that says nothing about thinking gets the
        server's default mode (chat, thinking or max, as `dsv4 chat --mode` names them)."""
        thinking_mode, effort = MODES[self.default_mode]
        return from_openai(data, effort_table=self.effort_table, default_thinking=thinking_mode == "thinking",
                           default_effort=effort)

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
            return error_response(path, APIError(400, str(e), getattr(e, "param", None)))
        except Exception:
            log.exception("%s %s failed", request.method, path)
            return error_response(path, APIError(500, "internal error (the server log has the details)"))

    return route


def build_app(model, model_name: str = "demo", api_key: str | None = None, max_queue: int = 64,
              max_batch: int = 8, prefill_chunk: int = 256, cache_size: int = 8, max_body: int | None = None,
              read_timeout: float = 20.0, allowed_hosts=LOOPBACK_NAMES, default_mode: str = "chat",
              allowed_origins=(), prompt_store=None, draft_tokens: int | None = None) -> FastAPI:
    """An ASGI app serving `model`; the scheduler starts with the app and stops with it.

    max_body: the largest request body in bytes (None: `intake.default_max_body` of the context);
    read_timeout: seconds a client has for its request headers, and again for its body (the header
    deadline needs the app served with `connection.uvicorn_config`); allowed_hosts: the `Host` names
    accepted ("*": any); default_mode: how OpenAI requests that say nothing about thinking are answered
    (chat, thinking or max; Anthropic requests follow Anthropic's default, no thinking);
    allowed_origins: the web origins granted CORS ("*": any; none by default); prompt_store: a
    `portable.prompt_store.StateStore`, the prompt cache's tier on disk that survives restarts;
    draft_tokens: MTP drafts per decode step for requests that do not say (None: the model's default)."""
    engine = Engine(model, max_queue=max_queue, max_batch=max_batch, prefill_chunk=prefill_chunk,
                    cache=PrefixCache(cache_size, disk=prompt_store) if cache_size or prompt_store else None,
                    draft_tokens=draft_tokens)
    limits = Limits(default_max_body(model.context) if max_body is None else max_body, read_timeout,
                    tuple(allowed_hosts))
    state = ServerState(engine, model.tokenizer, model_name, model.context,
                        getattr(model.config, "encoding", "2604"), api_key, limits, default_mode)

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

    page = resources.files(__package__).joinpath("page/index.html").read_text(encoding="utf-8")

    async def chat_page(state, request):
        return HTMLResponse(page, headers=PAGE_HEADERS)

    app.add_api_route("/health", _guard(state, health, auth=False), methods=["GET"])
    app.add_api_route("/", _guard(state, chat_page, auth=False), methods=["GET"])
    routes = (openai_api.ROUTES + responses_api.ROUTES + anthropic_api.ROUTES + tokens_api.ROUTES
              + metrics.ROUTES)
    for path, handler, methods in routes:
        app.add_api_route(path, _guard(state, handler), methods=methods)
    app.add_middleware(Intake, limits=limits, json_paths=[path for path, _, methods in routes if "POST" in methods])
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    app.add_middleware(metrics.Accounting, metrics=state.metrics,
                       routes=[r.path for r in app.routes if "{" not in r.path])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail)))

    return app

"""Per-request accounting: Prometheus metrics at `/metrics` and one access-log line per request.

`Accounting` is the outermost ASGI middleware, so every request is counted and logged once, including
those `intake` refuses before any route runs.  It opens a `RequestRecord` for the request and closes
it when the response has been sent in full (a stream included).  Generation numbers (prompt, cached
and completion tokens, time to first token, tokens/s) reach the record from the adapters, which pass
their generation's events through `observe`; it finds the record through a context variable, because
a streaming response's frames generator runs after the route returned and is handed no request
(asyncio tasks started for it copy the context, so they see the same record).

Tokens/s is the decode rate: completion tokens after the first over the time from the first token to
the last, so a long prompt shows up in the time to first token, not in the rate.  With several
generations per request (n > 1) the completion tokens add up, the prompt is counted once.

The metrics live in a `CollectorRegistry` of the app, not the process-wide default: every `build_app`
(tests build many) gets its own counters, and nothing else in the process shows up at `/metrics`.
Queue depth and running jobs are read from the engine at scrape time.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass, field

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .generation import Done, TokenInfo

log = logging.getLogger("dsv4.serve")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
OTHER_ROUTE = "other"             # the route label of paths the server does not serve

_current: contextvars.ContextVar = contextvars.ContextVar("dsv4_request_record", default=None)


@dataclass
class RequestRecord:
    """What one request did, filled in as it runs (times from `time.perf_counter`)."""
    start: float = field(default_factory=time.perf_counter)
    status: int = 500                 # until a response starts: a request that dies unanswered is an error
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tokens_per_s(self) -> float | None:
        if self.completion_tokens < 2 or self.last_token is None or self.last_token <= self.first_token:
            return None
        return (self.completion_tokens - 1) / (self.last_token - self.first_token)

    def saw(self, event) -> None:
        now = time.perf_counter()
        if isinstance(event, TokenInfo) and self.first_token is None:
            self.first_token = now
        elif isinstance(event, Done):
            self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
            self.cached_tokens = max(self.cached_tokens, event.cached_tokens)
            self.completion_tokens += event.completion_tokens
            self.last_token = now


async def observe(events):
    """`events` (a generation's) passed through unchanged, noted in the current request's record."""
    record = _current.get()
    async with contextlib.aclosing(events):        # leaving early closes (and so cancels) the generation
        async for event in events:
            if record is not None:
                record.saw(event)
            yield event


class Metrics:
    """The app's Prometheus collectors; `engine_stats` (a callable returning `Engine.stats()`) feeds the
    queue gauges when scraped."""

    def __init__(self, engine_stats):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsv4_requests", "HTTP requests by route and status", ("route", "status"),
                                registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "prompt tokens of generation requests", registry=r)
        self.cached_tokens = Counter("dsv4_cached_prompt_tokens", "prompt tokens served from the prefix cache",
                                     registry=r)
        self.completion_tokens = Counter("dsv4_completion_tokens", "generated tokens", registry=r)
        Gauge("dsv4_queue_depth", "requests waiting for the scheduler", registry=r).set_function(
            lambda: engine_stats()["waiting"])
        Gauge("dsv4_running_requests", "requests being prefilled or decoded", registry=r).set_function(
            lambda: engine_stats()["running"])
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "request arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.rate = Histogram("dsv4_generation_tokens_per_second", "decode rate of a request after its first "
                              "token", buckets=RATE_BUCKETS, registry=r)

    def record(self, route: str, rec: RequestRecord) -> None:
        self.requests.labels(route, str(rec.status)).inc()
        self.prompt_tokens.inc(rec.prompt_tokens)
        self.cached_tokens.inc(rec.cached_tokens)
        self.completion_tokens.inc(rec.completion_tokens)
        if rec.ttft is not None:
            self.ttft.observe(rec.ttft)
        if rec.tokens_per_s is not None:
            self.rate.observe(rec.tokens_per_s)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class Accounting:
    """ASGI middleware: a `RequestRecord` per HTTP request, then its metrics and one access-log line.
    `routes` are the paths served without parameters (labels for requests refused before routing)."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rec = RequestRecord()
        token = _current.set(rec)
        closed = False

        async def sending(message):
            nonlocal closed
            if message["type"] == "http.response.start":
                rec.status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                closed = True                   # accounted before this connection's next request is read
                self._close(scope, rec)

        try:
            await self.app(scope, receive, sending)
        finally:
            _current.reset(token)
            if not closed:                      # the app failed or the client left before the end
                self._close(scope, rec)

    def _close(self, scope, rec: RequestRecord) -> None:
        route = getattr(scope.get("route"), "path", None) or \
            (scope["path"] if scope["path"] in self.routes else OTHER_ROUTE)
        self.metrics.record(route, rec)
        log.info("%s %s %d prompt=%d cached=%d completion=%d ttft=%s tok/s=%s time=%.3fs", scope["method"],
                 scope["path"], rec.status, rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens,
                 "-" if rec.ttft is None else f"{rec.ttft:.3f}s",
                 "-" if rec.tokens_per_s is None else f"{rec.tokens_per_s:.1f}", time.perf_counter() - rec.start)


async def metrics_route(state, request):
    return state.metrics.exposition()


ROUTES = [("/metrics", metrics_route, ["GET"])]

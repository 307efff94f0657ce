"""What a request must satisfy before any route sees it: an allowed `Host`, a JSON content type, and a
body that is small enough and arrives in time.

Why here, in front of the routes: these are properties of the HTTP exchange, not of an API, and they
must hold before anything costly happens.  The body is read here, against the limit and the read
deadline, and handed on whole; a route never holds more than `max_body` bytes, and a slow or oversized
upload is refused without a route thread, a JSON parse or a tokenizer ever seeing it.

* `Host`: a web page can make a browser send "simple" cross-origin POSTs to a local server, and read
  the answers after a DNS rebinding; both carry the page's host name in `Host`, so only the names the
  server is reached by are accepted (403).  A loopback bind accepts the loopback names, a wildcard bind
  (0.0.0.0, ::) any name, another address only itself; `allowed_hosts` replaces that choice.
* Content type: a browser sends `text/plain` or form bodies cross-origin without asking; it must ask
  (CORS preflight, granted only to the origins of `dsv4 serve --allowed-origins`) before sending
  `application/json`.  So the JSON endpoints accept only `application/json` (415).  A preflight is an
  OPTIONS request without a body: it passes here (Host checked) and is answered by the CORS layer.
* Size: a declared `Content-Length` above the limit is refused before one byte of the body is read; a
  chunked body is counted as it arrives (413).  The unread rest is discarded by the HTTP layer, which
  keeps the connection for the client's next request.
* Time: the body must arrive within `read_timeout` seconds (408, and the connection is closed); the
  request headers have the same deadline, enforced by `connection.DeadlineH11Protocol`.
A client that disconnects while sending is logged in one line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

from .errors import APIError, error_response

log = logging.getLogger("dsv4.serve")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
MIN_MAX_BODY = 4_000_000        # bytes: the body limit never goes below this ...
BODY_BYTES_PER_TOKEN = 16       # ... and otherwise allows this much JSON per token of context


def default_max_body(context: int) -> int:
    """The default body limit: enough JSON for a prompt filling the context (16 bytes per token covers
    long tokens and \\u-escaped non-ASCII text), and never under 4 MB."""
    return max(MIN_MAX_BODY, BODY_BYTES_PER_TOKEN * context)


def hosts_for_bind(host: str) -> tuple:
    """The `Host` names a server bound to `host` is reached by (see the module docstring)."""
    if host in ("", "0.0.0.0", "::"):
        return (ANY_HOST,)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    return LOOPBACK_NAMES if loopback else (host,)


def host_name(header: str) -> str:
    """The name in a `Host` header, without port, brackets or trailing dot, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):                  # [IPv6]:port
        name = header[1:].partition("]")[0]
    elif header.count(":") == 1:                # name:port
        name = header.partition(":")[0]
    else:                                       # a name, or an IPv6 address written bare
        name = header
    return name.rstrip(".")


@dataclass(frozen=True)
class Limits:
    """max_body: bytes; read_timeout: seconds for the headers, and again for the body; allowed_hosts:
    `Host` names accepted (`ANY_HOST` accepts every name)."""
    max_body: int
    read_timeout: float = 20.0
    allowed_hosts: tuple = LOOPBACK_NAMES

    def __post_init__(self):
        if self.max_body < 1 or not self.read_timeout > 0:
            raise ValueError("max_body and read_timeout must be > 0")


class ClientLeft(Exception):
    """The client disconnected before its request body was complete."""


class Intake:
    """ASGI middleware applying `limits` to every HTTP request; `json_paths` are the routes that take a
    JSON body (POST)."""

    def __init__(self, app, limits: Limits, json_paths):
        self.app, self.limits, self.json_paths = app, limits, frozenset(json_paths)
        self._hosts = None if ANY_HOST in limits.allowed_hosts else \
            frozenset(host_name(h) for h in limits.allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], _headers(scope)
        try:
            self._check_host(headers.get("host"))
            if scope["method"] == "POST" and path in self.json_paths:
                _check_content_type(headers.get("content-type", ""))
                body = await self._read_body(headers.get("content-length"), receive)
                receive = _replay(body, receive)
        except APIError as e:
            log.info("%s %s -> %d: %s", scope["method"], path, e.status, e.message)
            close = {"connection": "close"} if e.status == 408 else None
            return await error_response(path, e, close)(scope, receive, send)
        except ClientLeft:
            log.info("%s %s: the client disconnected while sending its request", scope["method"], path)
            return
        await self.app(scope, receive, send)

    def _check_host(self, header: str | None) -> None:
        if self._hosts is None or header is None:      # HTTP/1.0 clients may send none; browsers always do
            return
        name = host_name(header)
        if name not in self._hosts:
            raise APIError(403, f"Host {name!r} is not allowed; this server answers to "
                                f"{', '.join(sorted(self._hosts))} (dsv4 serve --allowed-hosts)",
                           code="host_not_allowed")

    async def _read_body(self, declared: str | None, receive) -> bytes:
        limit = self.limits.max_body
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(f"{int(declared):,}", limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.read_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.limits.read_timeout:g} s",
                               code="request_timeout") from None
            if message["type"] == "http.disconnect":
                raise ClientLeft()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(f"more than {limit:,}", limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _headers(scope) -> dict:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def _check_content_type(header: str) -> None:
    media = header.partition(";")[0].strip().lower()
    if media != "application/json":
        shown = repr(media) if media else "none"
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                            f"(got {shown})", code="unsupported_media_type")


def _too_large(size: str, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes; this server accepts at most {limit:,} "
                         f"(dsv4 serve --max-body-mb)", code="request_too_large")


def _replay(body: bytes, receive):
    """A `receive` that yields the body already read, then whatever the client sends next (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay

"""API errors and how each API family spells them.

One exception type (`APIError`) is raised everywhere in the server; the route decides the wire format,
because a client library only understands its own: OpenAI clients read
`{"error": {"message", "type", "param", "code"}}`, Anthropic clients read
`{"type": "error", "error": {"type", "message"}}` and pick their exception class from the HTTP status.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
_OPENAI_TYPES = {429: "rate_limit_error"}


class APIError(Exception):
    """An error answered with `status`; `param` names the offending request field when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def openai_error_body(err: APIError) -> dict:
    kind = _OPENAI_TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error")
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def anthropic_error_body(err: APIError) -> dict:
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, err: APIError, headers: dict | None = None) -> JSONResponse:
    """`err` in the format of the API family that serves `path`."""
    body = anthropic_error_body(err) if is_anthropic(path) else openai_error_body(err)
    return JSONResponse(body, status_code=err.status, headers=headers)

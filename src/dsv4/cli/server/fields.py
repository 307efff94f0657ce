"""Typed reading of JSON request bodies, shared by both API adapters.

Why not pydantic models: each API must answer in its own error format with the offending parameter
named, unknown fields must pass (clients send many we ignore), and the request is handed on as a plain
dict to the encoding layer's `from_openai` / `from_anthropic`.  So a body is parsed once and its
fields are read with their expected JSON types; every mistake is an `APIError(400)`.
"""

from __future__ import annotations

import json

from dsv4.portable.sampling import SamplingParams

from .errors import bad_request

_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "array": (list,), "object": (dict,)}


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for name in ("integer", "number", "string", "array", "object"):
        if isinstance(value, _TYPES[name]):
            return name
    return type(value).__name__


def _is(value, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == "boolean"
    return isinstance(value, _TYPES[kind])


class Body:
    """A parsed JSON object body."""

    def __init__(self, raw: bytes):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise bad_request(f"the request body must be a JSON object, got {_json_type(data)}")
        self.data = data

    def get(self, name: str, *kinds: str, default=None, required: bool = False):
        """The value of `name` if it has one of the JSON `kinds`; `default` when absent or null."""
        value = self.data.get(name)
        if value is None:
            if required:
                raise bad_request(f"missing required parameter '{name}'", name)
            return default
        if not any(_is(value, k) for k in kinds):
            raise bad_request(f"'{name}' must be of type {' or '.join(kinds)}, got {_json_type(value)}", name)
        return value

    def number(self, name: str, default, low: float, high: float, low_open: bool = False):
        """A number in [low, high] (or (low, high] with `low_open`)."""
        value = self.get(name, "number", default=default)
        if value is not None and not ((low < value if low_open else low <= value) and value <= high):
            span = f"{'(' if low_open else '['}{low}, {high}]"
            raise bad_request(f"'{name}' must be in {span}, got {value}", name)
        return value

    def integer(self, name: str, default, low: int, high: int | None = None):
        value = self.get(name, "integer", default=default)
        if value is not None and (value < low or (high is not None and value > high)):
            span = f"≥ {low}" if high is None else f"in [{low}, {high}]"
            raise bad_request(f"'{name}' must be an integer {span}, got {value}", name)
        return value

    def strings(self, name: str, max_items: int | None = None) -> tuple:
        """A string or a list of strings (OpenAI `stop`, Anthropic `stop_sequences`) as a tuple."""
        value = self.get(name, "string", "array", default=[])
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(s, str) for s in items):
            raise bad_request(f"'{name}' must be a string or a list of strings", name)
        if max_items is not None and len(items) > max_items:
            raise bad_request(f"'{name}' accepts at most {max_items} entries, got {len(items)}", name)
        return tuple(items)

    def unsupported_unless(self, name: str, allowed) -> None:
        """Refuse a parameter we cannot honour unless it has a value that changes nothing."""
        value = self.data.get(name)
        if value is not None and value not in allowed:
            raise bad_request(f"'{name}'={json.dumps(value)} is not supported by this server", name)


def sampling_params(body: Body, max_temperature: float) -> SamplingParams:
    """Sampler settings shared by all endpoints (top_k/min_p/repetition_penalty are the common
    open-source extensions; presence/frequency penalties and logit_bias are refused unless neutral)."""
    body.unsupported_unless("presence_penalty", (0, 0.0))
    body.unsupported_unless("frequency_penalty", (0, 0.0))
    body.unsupported_unless("logit_bias", ({},))
    top_k = body.integer("top_k", 0, -1)
    return SamplingParams(
        temperature=body.number("temperature", 1.0, 0.0, max_temperature),
        top_p=body.number("top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),
        min_p=body.number("min_p", 0.0, 0.0, 0.999),
        repetition_penalty=body.number("repetition_penalty", 1.0, 0.0, 100.0, low_open=True),
        seed=body.get("seed", "integer"))

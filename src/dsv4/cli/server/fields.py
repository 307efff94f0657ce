"""Typed reading of JSON request bodies, shared by both API adapters.

Why not pydantic models: each API must answer in its own error format with the offending parameter
named, unknown fields must pass (clients send many we ignore), and the request is handed on as a plain
dict to the encoding layer's `from_openai` / `from_anthropic`.  So a body is parsed once and its
fields are read with their expected JSON types; every mistake is an `APIError(400)`.

What no field may hold, checked once over the whole body: nesting deeper than `MAX_DEPTH` (the encoder
copies and dumps requests recursively, and a 500-deep tool schema exhausted Python's recursion), a lone
UTF-16 surrogate (JSON can escape one, `\\ud800`, but it is not Unicode text and cannot be tokenized),
and NaN or Infinity (not JSON, though Python's parser takes them).
"""

from __future__ import annotations

import asyncio
import json
import math
import re

from dsv4.portable.sampling import SamplingError, SamplingParams

from .errors import bad_request

MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
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


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _where(path: tuple) -> str:
    """A body path in JavaScript notation: messages[0].content."""
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(path))


def _check_tree(data: dict) -> None:
    """Refuse what no field may hold (module docstring); iterative, so depth costs no recursion."""
    stack = [(data, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"'{_where(path[:3])}...' is nested more than {MAX_DEPTH} levels deep", path[0])
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, str):
                if _SURROGATE.search(value):
                    raise bad_request(f"'{_where(path + (key,))}' contains a lone UTF-16 surrogate, which is "
                                      "not Unicode text", (path + (key,))[0])
            elif isinstance(value, (dict, list)):
                stack.append((value, depth + 1, path + (key,)))
            if isinstance(key, str) and _SURROGATE.search(key):
                raise bad_request(f"a key in '{_where(path) or 'the body'}' contains a lone UTF-16 surrogate",
                                  path[0] if path else None)


class Body:
    """A parsed JSON object body."""

    def __init__(self, raw: bytes):
        try:
            data = json.loads(raw, parse_float=_finite, parse_constant=_not_json)
        except RecursionError:
            raise bad_request(f"the request body is nested more than {MAX_DEPTH} levels deep") from None
        except ValueError as e:              # UnicodeDecodeError included
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise bad_request(f"the request body must be a JSON object, got {_json_type(data)}")
        _check_tree(data)
        self.data = data

    @classmethod
    async def read(cls, request) -> "Body":
        """The request's body, parsed and checked off the event loop (it may be megabytes)."""
        return await asyncio.to_thread(cls, await request.body())

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

    def number(self, name: str, default, low: float, high: float):
        """A number in [low, high]."""
        value = self.get(name, "number", default=default)
        if value is not None and not low <= value <= high:
            raise bad_request(f"'{name}' must be in [{low}, {high}], got {value}", name)
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


def logit_bias(body: Body, vocab_size: int) -> tuple:
    """OpenAI's `logit_bias`, {"token id": bias}, as ((id, bias), ...); the ids must be in the
    vocabulary (the bias range is the sampler's check)."""
    value = body.get("logit_bias", "object", default={})
    pairs = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise bad_request(f"'logit_bias' keys must be token ids in 0..{vocab_size - 1}, got {key!r}",
                              "logit_bias")
        if not _is(bias, "number"):
            raise bad_request(f"'logit_bias' values must be numbers, got {_json_type(bias)}", "logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def draft_tokens(body: Body, model) -> int | None:
    """The extension field `draft_tokens` (MTP drafts per decode step; absent: the server's default),
    refused where `speculative.check_draft_tokens` refuses it."""
    from dsv4.portable.speculative import MAX_DRAFT, check_draft_tokens
    value = body.integer("draft_tokens", None, 0, MAX_DRAFT)
    if value is None:
        return None
    try:
        return check_draft_tokens(value, model, "'draft_tokens'")
    except ValueError as e:
        raise bad_request(str(e), "draft_tokens") from None


def sampling_params(body: Body, max_temperature: float, vocab_size: int | None = None) -> SamplingParams:
    """Sampler settings shared by all endpoints (top_k/min_p/repetition_penalty are the common
    open-source extensions; presence/frequency penalties follow OpenAI; `logit_bias` is read where the
    API has it, `vocab_size` given, and refused unless empty elsewhere).  The API caps temperature;
    every other bound is the sampler's own (`SamplingParams`), so what is accepted here is exactly what
    the sampler runs."""
    if vocab_size is None:
        body.unsupported_unless("logit_bias", ({},))
    top_k = body.integer("top_k", 0, -1)             # -1: the common spelling of "off"
    try:
        return SamplingParams(
            temperature=body.number("temperature", 1.0, 0.0, max_temperature),
            top_p=body.get("top_p", "number", default=1.0),
            top_k=max(top_k, 0),
            min_p=body.get("min_p", "number", default=0.0),
            repetition_penalty=body.get("repetition_penalty", "number", default=1.0),
            seed=body.get("seed", "integer"),
            presence_penalty=body.get("presence_penalty", "number", default=0.0),
            frequency_penalty=body.get("frequency_penalty", "number", default=0.0),
            logit_bias=() if vocab_size is None else logit_bias(body, vocab_size))
    except SamplingError as e:
        raise bad_request(str(e), e.param) from None

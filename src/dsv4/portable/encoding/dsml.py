"""DSML tool-call markup: rendering history calls into a prompt and assembling parsed arguments.

Both directions share one JSON convention (spec §3.11): Python `json.dumps(..., ensure_ascii=False)`,
which is what the model saw in training (`", "` / `": "` separators, raw non-ASCII).
"""

from __future__ import annotations

import json
import math

from .errors import EncodingError
from .pieces import Prompt
from .tokens import INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN, TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN


def dumps(value) -> str:
    """JSON exactly as the reference writes it; unserializable values are a client error."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise EncodingError(f"value is not JSON-serializable: {e}") from None


def call_arguments(function: dict) -> dict:
    """The arguments of a history tool call as an ordered dict.

    Accepts a JSON-object string (OpenAI wire format) or an already-parsed dict.  A dict is used as
    is – the reference wraps it as one `arguments` parameter (E19), which teaches the model a wrong
    shape.  Missing/None/blank means no arguments.  A string that is not JSON keeps the reference
    fallback `{"arguments": raw}` (E18).  Valid JSON that is not an object is refused: the reference
    crashes on it and there is no faithful rendering.
    """
    raw = function.get("arguments")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise EncodingError(f"tool-call arguments must be a JSON object or string, got {type(raw).__name__}")
    try:
        value = json.loads(raw)
    except ValueError:
        return {"arguments": raw}
    if not isinstance(value, dict):
        raise EncodingError(f"tool-call arguments must be a JSON object, got {raw[:60]!r}")
    return value


def render_tool_calls(prompt: Prompt, tool_calls: list) -> None:
    """Append `\\n\\n<｜DSML｜tool_calls>…</｜DSML｜tool_calls>` for an assistant turn (spec §3.7).

    Names, keys and values are client data, so they go in as plain text; only the markup is trusted.
    Values are inserted raw (the format has no escaping, spec §7.7).
    """
    prompt.template(f"\n\n{TOOL_CALLS_OPEN}\n")
    for n, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise EncodingError("each tool call needs a function object with a string name")
        if n:
            prompt.text("\n")
        prompt.template(f'{INVOKE_OPEN} name="')
        prompt.text(function["name"])
        prompt.template('">\n')
        for k, (key, value) in enumerate(call_arguments(function).items()):
            if not isinstance(key, str):
                raise EncodingError(f"tool-call argument names must be strings, got {key!r}")
            is_string = isinstance(value, str)
            if k:
                prompt.text("\n")
            prompt.template(f'{PARAM_OPEN} name="')
            prompt.text(key)
            prompt.template(f'" string="{"true" if is_string else "false"}">')
            prompt.text(value if is_string else dumps(value))
            prompt.template(PARAM_CLOSE)
        prompt.template(f"\n{INVOKE_CLOSE}")
    prompt.template(f"\n{TOOL_CALLS_CLOSE}")


def is_strict_json(text: str) -> bool:
    """Whether `text` is one JSON value as RFC 8259 defines it.  Python's `json` also reads `NaN`,
    `Infinity` and `-Infinity`, and reads `1e400` as inf, which no strict JSON parser (and no
    `json.dumps(..., allow_nan=False)`) accepts; nesting too deep to read counts as not JSON."""
    try:
        json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return False
    return True


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a double")
    return value


def arguments_json(params: list) -> str:
    """OpenAI `arguments` string from parsed `(key, is_string, raw_value)` triples (spec §5.2 step 3d).

    String values are JSON-quoted; other values are copied verbatim, as the reference does, so a
    well-formed completion round-trips byte for byte (the parser passes a value that is not strict JSON
    as a string, so the result is always strict JSON).
    """
    items = (f"{dumps(key)}: {dumps(raw) if is_string else raw}" for key, is_string, raw in params)
    return "{" + ", ".join(items) + "}"

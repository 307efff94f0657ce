"""Strict completion parser: the reference's algorithm and its errors (encoding spec §5.2).

It accepts exactly what a well-behaved model writes and raises `ParseError` otherwise; tests and
offline tools use it as the definition of "well-formed".  Servers use the tolerant `StreamParser`.
"""

from __future__ import annotations

import re

from .dsml import arguments_json
from .errors import ParseError
from .tokens import (DSML, EOS, FORBIDDEN_IN_TEXT, INVOKE_OPEN, PARAM_OPEN, THINK_CLOSE,
                     TOOL_CALLS_CLOSE, TOOL_CALLS_MARKER)

INVOKE_END = f"</{DSML}invoke"
PARAM_END = f"/{DSML}parameter"
# re.match, not fullmatch: the reference relies on `$` also matching before one final "\n", which is
# how the encoder's empty invoke body `…">\n\n</｜DSML｜invoke>` parses (P13).
INVOKE_NAME_RE = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
PARAM_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)


def read_until(text: str, start: int, stops):
    """(index after the earliest stop, text before it, the stop) or (len, rest, None)."""
    best = None
    for stop in stops:
        pos = text.find(stop, start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return len(text), text[start:], None
    pos, stop = best
    return pos + len(stop), text[start:pos], stop


def parse_completion(text: str, thinking_mode: str = "thinking") -> dict:
    """An OpenAI assistant message from a completion that starts right after the generation prompt."""
    i, reasoning = 0, ""
    if thinking_mode == "thinking":
        i, reasoning, stop = read_until(text, 0, [THINK_CLOSE, TOOL_CALLS_MARKER])
        if stop != THINK_CLOSE:
            raise ParseError("Invalid thinking format: missing </think>")
    elif thinking_mode != "chat":
        raise ParseError(f"thinking_mode must be 'thinking' or 'chat', got {thinking_mode!r}")
    i, content, stop = read_until(text, i, [EOS, TOOL_CALLS_MARKER])
    tool_calls = []
    if stop == TOOL_CALLS_MARKER:
        i, tool_calls = _parse_tool_calls(text, i)
        i, rest, _ = read_until(text, i, [EOS])
        if rest or i != len(text):
            raise ParseError("Invalid format: unexpected text after the tool calls")
    elif stop != EOS:
        raise ParseError("Invalid format: missing EOS token")
    for name, value in (("reasoning_content", reasoning), ("content", content)):
        for token in FORBIDDEN_IN_TEXT:
            if token in value:
                raise ParseError(f"Invalid format: {name} contains {token!r}")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": tool_calls}


def _parse_tool_calls(text: str, i: int):
    calls = []
    while True:
        i, skipped, stop = read_until(text, i, [INVOKE_OPEN, TOOL_CALLS_CLOSE])
        if skipped != ">\n":
            raise ParseError("Invalid format: bad tool_calls/invoke separator")
        if stop != INVOKE_OPEN:
            if stop is None:
                raise ParseError("Invalid format: unterminated tool_calls block")
            return i, calls
        i, head, stop = read_until(text, i, [PARAM_OPEN, INVOKE_END])
        m = INVOKE_NAME_RE.match(head)
        if m is None or stop is None:
            raise ParseError("Invalid format: bad invoke header")
        name, params, seen = m.group(1), [], set()
        while stop == PARAM_OPEN:
            i, body, end = read_until(text, i, [PARAM_END])
            p = PARAM_RE.match(body)
            if p is None or end is None:
                raise ParseError("Invalid format: bad parameter")
            key, flag, value = p.groups()
            if key in seen:
                raise ParseError(f"Invalid format: duplicate parameter {key!r}")
            seen.add(key)
            params.append((key, flag == "true", value))
            i, skipped, stop = read_until(text, i, [PARAM_OPEN, INVOKE_END])
            if skipped != ">\n":
                raise ParseError("Invalid format: bad parameter separator")
        if stop is None:
            raise ParseError("Invalid format: unterminated invoke")
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments_json(params)}})

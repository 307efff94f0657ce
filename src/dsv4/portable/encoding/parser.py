"""Strict completion parser: the reference's algorithm and its errors (encoding spec §5.2).

It accepts exactly what a well-behaved model writes and raises `ParseError` otherwise; tests and
offline tools use it as the definition of "well-formed".  Servers use the tolerant `StreamParser`, which
reads tool calls with the same `ToolCallsReader` (told to warn instead of raising), so the two agree on
every well-formed completion by construction, whatever a parameter value contains.

One deliberate deviation from the reference (spec §5.2 step 3d copies `string="false"` values verbatim):
a value that is not strict JSON (`NaN`, `Infinity`, a number beyond a double, or no JSON at all) becomes
a JSON string of its raw text, so `arguments` is always strict JSON and the call is never lost.
"""

from __future__ import annotations

import re

from .dsml import arguments_json, is_strict_json
from .errors import ParseError
from .tokens import (DSML, EOS, FORBIDDEN_IN_TEXT, INVOKE_OPEN, PARAM_OPEN, THINK_CLOSE,
                     TOOL_CALLS_CLOSE, TOOL_CALLS_MARKER)

INVOKE_END = f"</{DSML}invoke"
PARAM_END = f"/{DSML}parameter"
# re.match, not fullmatch: the reference relies on `$` also matching before one final "\n", which is
# how the encoder's empty invoke body `…">\n\n</｜DSML｜invoke>` parses (P13).
INVOKE_NAME_RE = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
PARAM_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)
# What a tolerant reader still takes for an invoke header (any whitespace around the `>`).
_LENIENT_NAME_RE = re.compile(r'\s*name="(.*?)"\s*>\s*$', re.DOTALL)
_SEPARATOR = ">\n"                     # what the grammar allows between the pieces of a block
_BETWEEN_STOPS = (INVOKE_OPEN, TOOL_CALLS_CLOSE, EOS)
_PART_STOPS = (PARAM_OPEN, INVOKE_END)


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
        reader = ToolCallsReader(i)
        tool_calls = reader.read(text, final=True)
        i, rest, _ = read_until(text, reader.pos, [EOS])
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


class ToolCallsReader:
    """The tool_calls grammar (spec §5.2 step 3) over the text after `<｜DSML｜tool_calls`, read one piece
    (separator, invoke header, parameter) at a time as far as the text seen so far allows.

    `read(text, final)` gets the whole text so far (each call's text extends the previous one) and returns
    the calls completed since the last call; once `done`, `pos` is where the block's text ends and `end`
    the stop that ended it (`</｜DSML｜tool_calls>`, EOS between invokes, or None: cut off).  Without
    `warn`, a deviation from the grammar raises ParseError (the strict parser).  With `warn`, it is
    reported there and read past: a bad separator is ignored, an invoke with an unreadable header or a
    malformed parameter is dropped, a repeated parameter keeps its first value, and a block cut off at
    the end keeps the invokes that completed.  Each search resumes where the previous one gave up, so a
    stream pays for every character once, not once per token.
    """

    def __init__(self, start: int = 0, warn=None):
        self.pos = start               # where the next piece begins
        self.done = False
        self.end: str | None = None
        self._warn = warn
        self._scanned = start          # no stop of the piece being read starts before this
        self._read_piece = self._between
        self._invoke: dict | None = None

    def read(self, text: str, final: bool = False) -> list:
        calls: list = []
        while not self.done and self._read_piece(text, final, calls):
            pass
        return calls

    # ------------------------------------------------------------ the pieces of a block
    def _between(self, text, final, calls) -> bool:
        got = self._take(text, _BETWEEN_STOPS, final)
        if got is None:
            return False
        skipped, stop = got
        if stop in (None, EOS):
            return self._cut_off("unterminated tool_calls block", stop)
        if skipped != _SEPARATOR:
            self._deviation("bad tool_calls/invoke separator", "a bad separator in a tool_calls block was ignored")
        if stop == TOOL_CALLS_CLOSE:
            self.done, self.end = True, stop
            return False
        self._read_piece = self._header
        return True

    def _header(self, text, final, calls) -> bool:
        got = self._take(text, _PART_STOPS, final)
        if got is None:
            return False
        head, stop = got
        if stop is None:
            return self._cut_off("bad invoke header")
        m = INVOKE_NAME_RE.match(head)
        if m is None:
            m = _LENIENT_NAME_RE.match(head)
            self._deviation("bad invoke header", "an invoke header was read leniently" if m else
                            "an invoke with an unreadable header was dropped")
        self._invoke = {"name": m and m.group(1), "params": [], "seen": set()}
        return self._after_part(stop, calls)

    def _parameter(self, text, final, calls) -> bool:
        got = self._take(text, (PARAM_END,), final)
        if got is None:
            return False
        body, stop = got
        if stop is None:
            return self._cut_off("bad parameter")
        p = PARAM_RE.match(body)
        if p is None:
            self._deviation("bad parameter", "a malformed parameter was dropped")
        elif p.group(1) in self._invoke["seen"]:
            self._deviation(f"duplicate parameter {p.group(1)!r}",
                            f"duplicate parameter {p.group(1)!r}: the first value was kept")
        else:
            key, flag, value = p.groups()
            self._invoke["seen"].add(key)
            self._invoke["params"].append((key, self._is_string(key, flag, value), value))
        self._read_piece = self._separator
        return True

    def _separator(self, text, final, calls) -> bool:
        got = self._take(text, _PART_STOPS, final)
        if got is None:
            return False
        skipped, stop = got
        if stop is None:
            return self._cut_off("unterminated invoke")
        if skipped != _SEPARATOR:
            self._deviation("bad parameter separator", "a bad separator between parameters was ignored")
        return self._after_part(stop, calls)

    # ------------------------------------------------------------ helpers
    def _after_part(self, stop: str, calls) -> bool:
        """After an invoke header or a parameter: another parameter, or the end of the invoke."""
        if stop == PARAM_OPEN:
            self._read_piece = self._parameter
            return True
        invoke, self._invoke = self._invoke, None
        if invoke["name"] is not None:
            calls.append({"type": "function", "function": {"name": invoke["name"],
                                                           "arguments": arguments_json(invoke["params"])}})
        self._read_piece = self._between
        return True

    def _is_string(self, key: str, flag: str, value: str) -> bool:
        """Whether the value goes into `arguments` as a JSON string: `string="true"`, or a `string="false"`
        value that is not strict JSON (the deviation from the reference the module docstring gives)."""
        if flag == "true":
            return True
        if is_strict_json(value):
            return False
        if self._warn is not None:
            self._warn(f'parameter {key!r} is marked string="false" but is not strict JSON; passed as a string')
        return True

    def _take(self, text: str, stops, final: bool):
        """(text skipped, stop) for the earliest stop at or after `pos`, both consumed; at the end of a
        final text (the rest, None); None when more text is needed to tell."""
        after, _, stop = read_until(text, self._scanned, stops)
        if stop is None and not final:
            self._scanned = max(self.pos, len(text) - max(map(len, stops)) + 1)
            return None
        skipped = text[self.pos:after - len(stop or "")]
        self.pos = self._scanned = after
        return skipped, stop

    def _cut_off(self, error: str, stop: str | None = None) -> bool:
        """The block ends before its `</｜DSML｜tool_calls>`: at EOS (`stop`) or at the end of the text."""
        self._deviation(error, "the tool_calls block was not closed; its unfinished part was dropped")
        self.done, self.end = True, stop
        return False

    def _deviation(self, error: str, warning: str) -> None:
        if self._warn is None:
            raise ParseError(f"Invalid format: {error}")
        self._warn(warning)

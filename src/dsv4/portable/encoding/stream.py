"""Tolerant incremental completion parser for serving (encoding spec §5.3).

Decoded text arrives in arbitrary pieces; the parser emits reasoning deltas, content deltas and one
event per completed tool call.  It never raises on model output and never lets DSML markup into
content.  What it does with malformed output (each case adds a line to `warnings`):

* a DSML tool block before `</think>` ends the reasoning implicitly (V4 sometimes forgets `</think>`);
* reasoning that never closes stays reasoning (its deltas were already streamed);
* DSML outside a well-formed block, or a block cut off by the length limit, is cut out of the content
  together with everything after it, keeping the invokes that did complete;
* a `string="false"` value that is not JSON becomes a JSON string, so `arguments` is always JSON;
* text after a closed tool block is passed through as content; a further block is parsed again.

A missing EOS is not an error (servers strip the stop token).  For every well-formed completion,
however it is split, `message()` equals `parse_completion()` of the whole text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .dsml import arguments_json
from .parser import PARAM_END, PARAM_RE
from .tokens import DSML, EOS, INVOKE_CLOSE, INVOKE_OPEN, PARAM_OPEN, THINK_CLOSE, TOOL_CALLS_CLOSE

_REASONING, _CONTENT, _TOOLS, _DONE = "reasoning", "content", "tools", "done"
_BLOCK_START = f"<{DSML}tool_calls"
_REASONING_STOPS = (THINK_CLOSE, "\n\n" + _BLOCK_START, _BLOCK_START, EOS)
_CONTENT_STOPS = (DSML, EOS)
# Suffixes worth holding back in content: anything that may still grow into DSML markup or EOS.
_CONTENT_HOLD = (f"\n\n<{DSML}", f"\n\n</{DSML}", f"<{DSML}", f"</{DSML}", DSML, EOS)
_TOOLS_STOPS = (INVOKE_CLOSE, TOOL_CALLS_CLOSE, EOS)
_INVOKE_NAME_RE = re.compile(r'\s*name="(.*?)">\s*$', re.DOTALL)


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A completed tool call; `arguments` is a JSON object string.  Ids are the server's business."""

    index: int
    name: str
    arguments: str


class StreamParser:
    """Feed decoded text with `feed()`, end with `finish()`; both return a list of events."""

    def __init__(self, thinking_mode: str = "thinking"):
        self._state = _REASONING if thinking_mode == "thinking" else _CONTENT
        self._buf = ""
        self._after_tools = False
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self.tool_calls: list[dict] = []
        self.warnings: list[str] = []

    @property
    def malformed(self) -> bool:
        """True when the output deviated from the V4 format (details in `warnings`)."""
        return bool(self.warnings)

    def feed(self, text: str) -> list:
        if self._state == _DONE:
            if text.strip():
                self._warn("text after the end of the completion was ignored")
            return []
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list:
        """End of generation: flush held-back text and close whatever is still open."""
        return self._drain(final=True) if self._state != _DONE else []

    def message(self) -> dict:
        """The OpenAI assistant message parsed so far (same shape as `parse_completion`)."""
        return {"role": "assistant", "content": "".join(self._content),
                "reasoning_content": "".join(self._reasoning), "tool_calls": list(self.tool_calls)}

    # ------------------------------------------------------------ state machine
    def _drain(self, final: bool) -> list:
        events: list = []
        step = {_REASONING: self._step_reasoning, _CONTENT: self._step_content, _TOOLS: self._step_tools}
        while self._state != _DONE and step[self._state](events, final):
            pass
        return events

    def _step_reasoning(self, events, final) -> bool:
        pos, stop = _earliest(self._buf, _REASONING_STOPS)
        if stop is None:
            self._emit_held(events, self._reasoning, ReasoningDelta, _REASONING_STOPS, final)
            if final:
                self._warn("reasoning was not closed with </think>")
                self._state = _DONE
            return False
        self._emit(events, self._reasoning, ReasoningDelta, self._buf[:pos])
        if stop == THINK_CLOSE:
            self._buf = self._buf[pos + len(stop):]
            self._state = _CONTENT
        elif stop == EOS:
            self._warn("reasoning was not closed with </think>")
            self._end_at_eos(pos)
        else:
            self._warn("tool calls started before </think>")
            self._buf = self._buf[self._buf.index(_BLOCK_START, pos):]
            self._state = _TOOLS
        return True

    def _step_content(self, events, final) -> bool:
        pos, stop = _earliest(self._buf, _CONTENT_STOPS)
        if stop is None:
            self._emit_held(events, self._content, ContentDelta, _CONTENT_HOLD, final)
            if final:
                self._state = _DONE
            return False
        if stop == EOS:
            self._emit(events, self._content, ContentDelta, self._buf[:pos])
            self._end_at_eos(pos)
            return True
        start = pos - 2 if self._buf.endswith("</", 0, pos) else pos - 1 if self._buf.endswith("<", 0, pos) else pos
        markup = self._buf[start:start + len(_BLOCK_START)]
        if not final and len(markup) < len(_BLOCK_START) and _BLOCK_START.startswith(markup):
            return False  # cannot tell a tool block from stray markup yet
        if markup != _BLOCK_START:
            self._warn("DSML markup outside a tool_calls block was removed")
        end = start - 2 if self._buf.endswith("\n\n", 0, start) else start
        self._emit(events, self._content, ContentDelta, self._buf[:end])
        self._buf = self._buf[start:]
        self._state = _TOOLS
        return True

    def _step_tools(self, events, final) -> bool:
        pos, stop = _earliest(self._buf, _TOOLS_STOPS)
        if stop == INVOKE_CLOSE:
            self._complete_invoke(events, self._buf[:pos])
            self._buf = self._buf[pos + len(stop):]
            return True
        if stop == TOOL_CALLS_CLOSE:
            if INVOKE_OPEN in self._buf[:pos]:
                self._warn("an unterminated invoke was dropped")
            self._buf = self._buf[pos + len(stop):]
            self._after_tools = True
            self._state = _CONTENT
            return True
        if stop == EOS or final:
            self._warn("the tool_calls block was not closed; its unfinished part was dropped")
            if stop == EOS:
                self._end_at_eos(pos)
            self._state = _DONE
        return False

    # ------------------------------------------------------------ helpers
    def _complete_invoke(self, events, chunk: str) -> None:
        start = chunk.find(INVOKE_OPEN)
        parsed = _parse_invoke(chunk[start + len(INVOKE_OPEN):], self._warn) if start != -1 else None
        if parsed is None:
            self._warn("a malformed invoke was dropped")
            return
        name, arguments = parsed
        event = ToolCallEvent(len(self.tool_calls), name, arguments)
        self.tool_calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
        events.append(event)

    def _emit(self, events, sink, kind, text: str) -> None:
        if not text:
            return
        if kind is ContentDelta and self._after_tools and text.strip():
            self._warn("text after the tool calls")
        sink.append(text)
        events.append(kind(text))

    def _emit_held(self, events, sink, kind, hold_stops, final) -> None:
        keep = 0 if final else _held_suffix(self._buf, hold_stops)
        self._emit(events, sink, kind, self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]

    def _end_at_eos(self, pos: int) -> None:
        if self._buf[pos + len(EOS):].strip():
            self._warn("text after the end of the completion was ignored")
        self._buf = ""
        self._state = _DONE

    def _warn(self, why: str) -> None:
        if why not in self.warnings:
            self.warnings.append(why)


def _earliest(buf: str, stops):
    """(position, stop) of the earliest stop in buf, or (-1, None)."""
    best = (-1, None)
    for stop in stops:
        pos = buf.find(stop)
        if pos != -1 and (best[1] is None or pos < best[0]):
            best = (pos, stop)
    return best


def _held_suffix(buf: str, stops) -> int:
    """Length of the longest suffix of buf that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(buf)), longest, -1):
            if buf.endswith(stop[:k]):
                longest = k
                break
    return longest


def _parse_invoke(body: str, warn):
    """(name, arguments JSON) of one invoke body (after `<｜DSML｜invoke`), or None if unusable."""
    head, *param_chunks = body.split(PARAM_OPEN)
    m = _INVOKE_NAME_RE.match(head)
    if m is None:
        return None
    params, seen = [], set()
    for chunk in param_chunks:
        p = PARAM_RE.match(chunk.split(PARAM_END)[0])
        if p is None:
            warn("a malformed parameter was dropped")
            continue
        key, flag, value = p.groups()
        if key in seen:
            warn(f"duplicate parameter {key!r}: the first value was kept")
            continue
        seen.add(key)
        is_string = flag == "true"
        if not is_string and not _is_json(value):
            warn(f"parameter {key!r} is marked string=\"false\" but is not JSON; passed as a string")
            is_string = True
        params.append((key, is_string, value))
    return m.group(1), arguments_json(params)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True

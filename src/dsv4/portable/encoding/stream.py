"""Tolerant incremental completion parser for serving (encoding spec §5.3).

Decoded text arrives in arbitrary pieces; the parser emits reasoning deltas, content deltas and one
event per completed tool call.  It never raises on model output and never lets DSML markup into
content.  Tool calls are read by the strict parser's own `ToolCallsReader`, told to warn instead of
raising, so a parameter value is read exactly as the strict parser reads it, DSML markup inside it
included.  What it does with malformed output (each case adds a line to `warnings`):

* a DSML tool block before `</think>` ends the reasoning implicitly (V4 sometimes forgets `</think>`);
* reasoning that never closes stays reasoning (its deltas were already streamed);
* DSML outside a well-formed block, or a block cut off by the length limit, is cut out of the content
  together with everything after it, keeping the invokes that did complete;
* inside a block, a bad separator is ignored, an invoke with an unreadable header or a malformed
  parameter is dropped, and a repeated parameter keeps its first value;
* a `string="false"` value that is not strict JSON becomes a JSON string (the strict parser does the
  same), so `arguments` is always strict JSON;
* text after a closed tool block is passed through as content; a further block is parsed again.

A missing EOS is not an error (servers strip the stop token).  For every well-formed completion,
however it is split, `message()` equals `parse_completion()` of the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass

from .parser import ToolCallsReader
from .tokens import DSML, EOS, THINK_CLOSE, TOOL_CALLS_CLOSE

_REASONING, _CONTENT, _TOOLS, _DONE = "reasoning", "content", "tools", "done"
_BLOCK_START = f"<{DSML}tool_calls"
_REASONING_STOPS = (THINK_CLOSE, "\n\n" + _BLOCK_START, _BLOCK_START, EOS)
_CONTENT_STOPS = (DSML, EOS)
# Suffixes worth holding back in content: anything that may still grow into DSML markup or EOS.
_CONTENT_HOLD = (f"\n\n<{DSML}", f"\n\n</{DSML}", f"<{DSML}", f"</{DSML}", DSML, EOS)


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
        self._tools: ToolCallsReader | None = None     # the open tool block's reader (state _TOOLS)
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
            self._end_at(pos + len(EOS))
        else:
            self._warn("tool calls started before </think>")
            self._open_tools(self._buf.index(_BLOCK_START, pos) + len(_BLOCK_START))
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
            self._end_at(pos + len(EOS))
            return True
        start = pos - 2 if self._buf.endswith("</", 0, pos) else pos - 1 if self._buf.endswith("<", 0, pos) else pos
        markup = self._buf[start:start + len(_BLOCK_START)]
        if not final and len(markup) < len(_BLOCK_START) and _BLOCK_START.startswith(markup):
            return False  # cannot tell a tool block from stray markup yet
        if markup != _BLOCK_START:
            self._warn("DSML markup outside a tool_calls block was removed")
        end = start - 2 if self._buf.endswith("\n\n", 0, start) else start
        self._emit(events, self._content, ContentDelta, self._buf[:end])
        # A block is read from after its opening tag; stray markup from itself, as a block missing it.
        self._open_tools(start + len(_BLOCK_START) if markup == _BLOCK_START else start)
        return True

    def _step_tools(self, events, final) -> bool:
        reader = self._tools
        for call in reader.read(self._buf, final):
            function = call["function"]
            events.append(ToolCallEvent(len(self.tool_calls), function["name"], function["arguments"]))
            self.tool_calls.append(call)
        if not reader.done:
            return False
        self._tools = None
        if reader.end == TOOL_CALLS_CLOSE:
            self._buf = self._buf[reader.pos:]
            self._after_tools = True
            self._state = _CONTENT
            return True
        self._end_at(reader.pos)
        return False

    # ------------------------------------------------------------ helpers
    def _open_tools(self, start: int) -> None:
        self._buf = self._buf[start:]
        self._tools = ToolCallsReader(warn=self._warn)
        self._state = _TOOLS

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

    def _end_at(self, end: int) -> None:
        """The completion ends at `end` (after its EOS); anything after it is ignored."""
        if self._buf[end:].strip():
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


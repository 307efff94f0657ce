"""One request's generation as seen from the event loop: token ids in, API-neutral text events out.

The engine emits raw token ids from its thread; this module turns them into what both API adapters
need: incremental UTF-8-safe text, stop strings applied to the raw text (held back while they might
still match), the V4 output split into reasoning / content / tool calls by the tolerant `StreamParser`
(so DSML never reaches content), per-token logprobs, and a final `Done` with usage.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dsv4.portable.encoding import ContentDelta, IncrementalDetokenizer, StreamParser
from dsv4.portable.sampling import SamplingParams

from .engine import Finished, Job, QueueFull
from .errors import APIError

DISCONNECT_POLL_S = 0.25      # how often a non-streaming request checks that its client is still there
_GONE = object()              # queued by the disconnect watcher


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    sampling: SamplingParams
    stop: tuple = ()                  # stop strings
    top_logprobs: int | None = None   # None: logprobs not requested


@dataclass(frozen=True)
class TokenInfo:
    """A generated token with its logprob (and the top alternatives when requested)."""
    id: int
    logprob: float
    top: list


@dataclass(frozen=True)
class Done:
    """finish: "stop" (end of turn), "length", "stop_sequence" or "error"."""
    finish: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    tool_calls: int = 0
    stop_sequence: str | None = None
    error: str | None = None


class ClientGone(Exception):
    """The HTTP client disconnected while a non-streaming request was waiting."""


class StopMatcher:
    """Cuts text at the first stop string; holds back a suffix that may still grow into one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self._buf = ""

    def feed(self, text: str):
        """(text safe to emit, matched stop string or None)."""
        self._buf += text
        hits = [(self._buf.find(s), s) for s in self.stops if s in self._buf]
        if hits:
            pos, stop = min(hits, key=lambda h: h[0])
            out, self._buf = self._buf[:pos], ""
            return out, stop
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), keep, -1):
                if self._buf.endswith(s[:k]):
                    keep = k
                    break
        out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out, None

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


class Generation:
    """Submits a job to the engine at construction (QueueFull → 429) and yields its events.

    mode: "thinking" or "chat" parse the V4 output format; "raw" passes decoded text through as
    content (legacy completions)."""

    def __init__(self, engine, tokenizer, prompt, params: GenParams, mode: str):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

        def emit(event):
            loop.call_soon_threadsafe(self._queue.put_nowait, event)

        self.job = Job(prompt=list(prompt), max_tokens=params.max_tokens, emit=emit, sampling=params.sampling,
                       stop_ids=frozenset({tokenizer.eos_id}), top_logprobs=params.top_logprobs or 0)
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(params.stop)
        self.parser = StreamParser(mode) if mode in ("thinking", "chat") else None
        try:
            engine.submit(self.job)
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None

    def cancel(self) -> None:
        self.job.cancel()

    async def events(self, is_disconnected=None):
        """Yield TokenInfo, ReasoningDelta, ContentDelta and ToolCallEvent events, then one `Done`.

        `is_disconnected` (an async callable), for non-streaming requests, is polled by a watcher task
        every DISCONNECT_POLL_S whether tokens flow or not (checking only when tokens paused let a
        gone client's job run to the end of its budget); a disconnect cancels the job and raises
        `ClientGone` here.  Streaming responses are cancelled by the server instead.  Either way the
        job is cancelled when this generator is left early."""
        watcher = asyncio.create_task(self._watch(is_disconnected)) if is_disconnected else None
        count = 0
        try:
            while True:
                event = await self._queue.get()
                if event is _GONE:
                    raise ClientGone()
                if isinstance(event, Finished):
                    for out in self._text(self._detok.flush(), final=True):
                        yield out
                    yield self._done(_FINISH.get(event.reason, "error"), count, error=event.error
                                     or (None if event.reason in _FINISH else "generation was cancelled"))
                    return
                count += 1
                yield TokenInfo(event.id, event.logprob, event.top_logprobs)
                if event.id in self.job.stop_ids:
                    continue
                text, stop = self._stops.feed(self._detok.push(event.id))
                for out in self._text(text, final=False, matcher=False):
                    yield out
                if stop is not None:
                    self.job.cancel()
                    for out in self._text("", final=True, matcher=False):
                        yield out
                    yield self._done("stop_sequence", count, stop_sequence=stop)
                    return
        finally:
            self.job.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _watch(self, is_disconnected) -> None:
        while not await is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.job.cancel()
        self._queue.put_nowait(_GONE)

    def _text(self, text: str, final: bool, matcher: bool = True):
        if matcher:
            more, _ = self._stops.feed(text)
            text = more + (self._stops.flush() if final else "")
        if self.parser is None:
            return [ContentDelta(text)] if text else []
        return self.parser.feed(text) + (self.parser.finish() if final else [])

    def _done(self, finish: str, count: int, **kw) -> Done:
        calls = len(self.parser.tool_calls) if self.parser is not None else 0
        return Done(finish, len(self.job.prompt), count, self.job.cached_tokens, calls, **kw)


_FINISH = {"stop": "stop", "length": "length", "error": "error"}

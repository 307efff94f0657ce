"""One request's generation as seen from the event loop: token ids in, API-neutral text events out.

The engine (`portable.engine`) emits raw token ids from its thread; this module turns them, through the
engine's `TextStream`, into what the API adapters need: incremental UTF-8-safe text cut at stop strings,
the V4 output split into reasoning / content / tool calls (so DSML never reaches content), per-token
logprobs, and a final `Done` with usage.  n > 1 is `Generation.choices`: n generations of one prompt,
the first prefilled and the others forks of its state, whose event streams `merge` interleaves.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from dsv4.portable.constraints import build_constraint
from dsv4.portable.engine import Finished, Job, QueueFull, TextStream
from dsv4.portable.sampling import SamplingParams

from .errors import APIError

DISCONNECT_POLL_S = 0.25      # how often a non-streaming request checks that its client is still there
_GONE = object()              # queued by the disconnect watcher


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    sampling: SamplingParams
    stop: tuple = ()                  # stop strings
    top_logprobs: int | None = None   # None: logprobs not requested
    n: int = 1                        # choices (`Generation.choices`)
    constraint: object = None         # masks and ends the output (see `portable.sampling`)
    draft_tokens: int | None = None   # MTP drafts per step (None: the server's default)


@dataclass(frozen=True)
class TokenInfo:
    """A generated token with its logprob (and the top alternatives when requested)."""
    id: int
    logprob: float
    top: list


def speculative_usage(drafted: int, accepted: int) -> dict:
    """The usage extension field of speculative decoding, the same in every API's usage object:
    {"speculative": {"drafted_tokens", "accepted_tokens"}}, or nothing when no token was drafted."""
    if not drafted:
        return {}
    return {"speculative": {"drafted_tokens": drafted, "accepted_tokens": accepted}}


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
    prefill_s: float = 0.0            # arrival to the first token
    decode_s: float = 0.0             # first token to the last
    drafted: int = 0                  # speculative decoding: tokens drafted, and kept
    accepted: int = 0

    def speculative(self) -> dict:
        return speculative_usage(self.drafted, self.accepted)

    def failure(self) -> APIError:
        """What a client is told of a failed generation ("error"), in every API's body or stream."""
        return APIError(500, f"generation failed: {self.error}")


async def output_constraint(engine, tokenizer, encoder_input):
    """The constraint the request's `output` rule asks for (None: the output is free), built off the
    event loop: a schema compiles in milliseconds, the tokenizer's llguidance view once in ~0.7 s."""
    rule = encoder_input.output
    if rule is None:
        return None
    return await asyncio.to_thread(build_constraint, rule, tokenizer, engine.model.config.vocab_size,
                                   encoder_input.thinking_mode)


class ClientGone(Exception):
    """The HTTP client disconnected while a non-streaming request was waiting."""


class Generation:
    """Submits a job to the engine at construction (QueueFull → 429) and yields its events.

    mode: "thinking" or "chat" parse the V4 output format; "raw" passes decoded text through as
    content (legacy completions).  `forks` (generations built with index > 0, which are not submitted
    themselves) start from this one's prefill: see `choices`."""

    def __init__(self, engine, tokenizer, prompt, params: GenParams, mode: str, index: int = 0, forks=()):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

        def emit(event):
            loop.call_soon_threadsafe(self._queue.put_nowait, event)

        constraint = params.constraint.fork() if index and params.constraint is not None else params.constraint
        self.job = Job(prompt=list(prompt), max_tokens=params.max_tokens, emit=emit, sampling=params.sampling,
                       stop_ids=frozenset({tokenizer.eos_id}), top_logprobs=params.top_logprobs or 0,
                       constraint=constraint, index=index, forks=[g.job for g in forks],
                       draft_tokens=params.draft_tokens)
        self._text_stream = TextStream(tokenizer, params.stop, mode)
        self.parser = self._text_stream.parser
        if index:
            return
        try:
            engine.submit(self.job)
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None

    @classmethod
    def choices(cls, engine, tokenizer, prompt, params: GenParams, mode: str) -> list:
        """`params.n` generations of `prompt`: one prefill, the others forked from it, each sampling with
        its own random stream (and its own fork of the constraint)."""
        forks = [cls(engine, tokenizer, prompt, params, mode, index=i) for i in range(1, params.n)]
        return [cls(engine, tokenizer, prompt, params, mode, forks=forks), *forks]

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
                    for out in self._text_stream.finish():
                        yield out
                    stop = self._text_stream.stop
                    if stop is not None:
                        yield self._done("stop_sequence", count, stop_sequence=stop)
                    else:
                        yield self._done(_FINISH.get(event.reason, "error"), count, error=event.error
                                         or (None if event.reason in _FINISH else "generation was cancelled"))
                    return
                count += 1
                yield TokenInfo(event.id, event.logprob, event.top_logprobs)
                for out in self._text_stream.push(event.id):
                    yield out
                if self._text_stream.stop is not None:
                    self.job.cancel()
                    yield self._done("stop_sequence", count, stop_sequence=self._text_stream.stop)
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

    def _done(self, finish: str, count: int, **kw) -> Done:
        calls = len(self.parser.tool_calls) if self.parser is not None else 0
        now = time.perf_counter()
        first = self.job.first_token_at if self.job.first_token_at is not None else now
        return Done(finish, len(self.job.prompt), count, self.job.cached_tokens, calls, **kw,
                    prefill_s=first - self.job.submitted_at, decode_s=now - first,
                    drafted=self.job.drafted, accepted=self.job.accepted)


async def merge(streams):
    """(index, event) from several event streams (the choices of one request) as they come; leaving
    early closes them all (and so cancels their jobs)."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index, events):
        try:
            async for event in events:
                await queue.put((index, event))
        finally:
            await queue.put((index, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, event = await queue.get()
            if event is end:
                open_streams -= 1
            else:
                yield index, event
        for task in tasks:
            task.result()                      # a stream's own failure is the request's
    finally:
        for task in tasks:
            task.cancel()


_FINISH = {"stop": "stop", "length": "length", "error": "error"}


async def gather(coroutines) -> list:
    """Their results, in order (the choices of one request); the first failure is raised and cancels
    the others (and so their jobs)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()

"""The Python API's generation: `stream`, `generate` and `generate_batch`, each driving a `portable.engine`
`Engine` on the caller's thread (the same scheduler the server runs on its own thread).

A `PrefixCache` passed as `cache` keeps the state after a conversation's tokens, and a later prompt that
extends those tokens exactly resumes from a fork of it (encoding spec §3.3 says when a multi-turn prompt
is a strict extension of the previous one); the fork costs a copy of the tokens held, far less than
re-reading them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .engine import Engine, Finished, Job, PrefixCache, Usage
from .runtime import ContextError
from .sampling import SamplingParams, Token

__all__ = ["Result", "PrefixCache", "Token", "stream", "generate", "generate_batch"]


@dataclass
class Result(Usage):
    tokens: list = field(default_factory=list)
    finish_reason: str = "length"   # "stop" (a stop id, or the constraint ended), "length" or "cancelled"
    logprobs: list = field(default_factory=list)

    def record(self, event) -> None:
        """Take in one engine event of this result's job."""
        if isinstance(event, Token):
            self.tokens.append(event.id)
            self.logprobs.append(event.logprob)
        elif isinstance(event, Finished):
            if event.exception is not None:
                raise event.exception
            self.finish_reason, self.completion_tokens = event.reason, event.completion_tokens
            self.prefill_s, self.decode_s = event.prefill_s, event.decode_s
            self.drafted, self.accepted = event.drafted, event.accepted


def _job(model, prompt_ids, max_tokens: int, sampling, stop_ids, top_logprobs: int, constraint, emit,
         draft_tokens: int | None = None) -> Job:
    """A job for `prompt_ids`, its budget capped by the context (the engine refuses one that overflows)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty: at least one token (normally BOS) is needed")
    model.check_length(len(prompt))
    budget = min(max_tokens, model.context - len(prompt))
    if budget < 1:
        raise ContextError(f"the prompt fills the context of {model.context} tokens: no room for an answer")
    if stop_ids is None:
        stop_ids = [model.config.eos_token_id]
    stop = {int(stop_ids)} if isinstance(stop_ids, (int, np.integer)) else {int(t) for t in stop_ids}
    return Job(prompt=prompt, max_tokens=budget, emit=emit, sampling=sampling or SamplingParams(),
               stop_ids=frozenset(stop), top_logprobs=top_logprobs, constraint=constraint,
               draft_tokens=draft_tokens)


def stream(model, prompt_ids, max_tokens: int = 256, sampling: SamplingParams | None = None,
           stop_ids=None, prefill_chunk: int = 256, cache: PrefixCache | None = None,
           top_logprobs: int = 0, should_stop: Callable[[], bool] | None = None,
           result: Result | None = None, constraint=None, snapshot_at: int | None = None,
           draft_tokens: int | None = None) -> Iterator[Token]:
    """Yield generated tokens one by one.  `result`, if given, is filled with usage and timings at the end
    (also when the consumer stops early or `should_stop()` turns true, e.g. on a client disconnect);
    `snapshot_at` also caches the state after that many prompt tokens (see `engine`).  An exception out
    of a step (KeyboardInterrupt included) leaves at once, caching nothing: the state may be cut mid-step.
    `draft_tokens`: tokens the MTP block drafts per step (`portable.speculative`; None: the model's
    default, 0: off); the tokens are those of plain decoding (greedy) or distributed as they are."""
    events: collections.deque = collections.deque()
    res = result if result is not None else Result()
    job = _job(model, prompt_ids, max_tokens, sampling, stop_ids, top_logprobs, constraint, events.append,
               draft_tokens)
    job.snapshot_at = snapshot_at
    res.prompt_tokens = len(job.prompt)
    engine = Engine(model, max_batch=1, prefill_chunk=prefill_chunk, cache=cache)
    engine.submit(job)

    def check():                        # after every prefill chunk and every token
        if should_stop is not None and should_stop():
            job.cancel()

    def take(event) -> bool:
        """Record `event`; a token the engine delivered after the consumer asked to stop (the rest of
        a speculative round) is dropped, so the output ends where plain decoding's would."""
        if isinstance(event, Token) and job.cancelled:
            return False
        res.record(event)
        if isinstance(event, Finished):
            res.completion_tokens = min(res.completion_tokens, len(res.tokens))
        return isinstance(event, Token)

    try:
        while engine.busy:
            engine.turn()
            res.cached_tokens = job.cached_tokens
            check()
            while events:
                event = events.popleft()
                if take(event):
                    yield event
                    check()
    except GeneratorExit:               # the consumer left early: the job ends and its state is cached
        job.cancel()
        while engine.busy:
            engine.turn()
        for event in events:
            take(event)
        raise


def generate(model, prompt_ids, **kw) -> Result:
    """Run `stream` to completion and return the tokens with usage and timings."""
    res = Result()
    for _ in stream(model, prompt_ids, result=res, **kw):
        pass
    return res


def generate_batch(model, prompts, max_tokens: int = 256, sampling: SamplingParams | None = None,
                   stop_ids=None, prefill_chunk: int = 256, cache: PrefixCache | None = None,
                   top_logprobs: int = 0, max_batch: int = 8, draft_tokens: int | None = None) -> list:
    """Generate for several prompts at once (their decode steps batched, `max_batch` rows at a time,
    drafting `draft_tokens` per step as `stream` does); one `Result` per prompt, in order."""
    results = [Result(prompt_tokens=len(p)) for p in prompts]
    events = [[] for _ in prompts]      # recorded after the run: a failed job's exception must reach the
    jobs = [_job(model, p, max_tokens, sampling, stop_ids, top_logprobs, None, e.append, draft_tokens)
            for p, e in zip(prompts, events)]           # caller, not the engine's delivery guard
    engine = Engine(model, max_queue=max(1, len(jobs)), max_batch=max_batch, prefill_chunk=prefill_chunk,
                    cache=cache)
    for job in jobs:
        engine.submit(job)
    while engine.busy:
        engine.turn()
    for job, res, evs in zip(jobs, results, events):
        for event in evs:
            res.record(event)
        res.cached_tokens = job.cached_tokens
    return results

"""Generation: chunked prefill, the decode loop, stop ids, streaming, and reuse of a cached prompt prefix.

Backend-agnostic: it drives `Model.step` (which updates a state in place) and samples on the host.  A
`PrefixCache` keeps the state after a conversation's tokens and the next chat turn resumes from a fork
of it when its prompt extends those tokens exactly (encoding spec §3.3 says when a multi-turn prompt is
a strict extension of the previous one); the fork costs a copy of the tokens held, far less than
re-reading them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .sampling import Sampler, SamplingParams, log_softmax


@dataclass
class Token:
    """One generated token as streamed."""
    id: int
    logprob: float
    top_logprobs: list = field(default_factory=list)   # [(id, logprob)] when requested


@dataclass
class Result:
    tokens: list
    finish_reason: str            # "stop" (a stop id was produced) or "length"
    prompt_tokens: int
    cached_tokens: int            # prompt tokens served from the prefix cache
    prefill_s: float
    decode_s: float
    logprobs: list = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0


class PrefixCache:
    """Keeps (token ids, state) snapshots; `lookup` returns the longest one that prefixes a new prompt.
    A stored state belongs to the cache: resume from `model.fork_state` of it, never from it directly."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._items: list = []

    def lookup(self, ids):
        best = None
        for toks, state in self._items:
            n = len(toks)
            if n <= len(ids) and (best is None or n > len(best[0])) and list(ids[:n]) == toks:
                best = (toks, state)
        return best

    def store(self, ids, state) -> None:
        self._items = [it for it in self._items if it[0] != list(ids)]
        self._items.append((list(ids), state))
        del self._items[:-self.capacity]


def _prefill(model, state, ids, chunk: int):
    logits = None
    for a in range(0, len(ids), chunk):
        logits, state = model.step(state, np.asarray(ids[a:a + chunk], dtype=np.int64)[None])
    return logits[0, -1], state


def stream(model, prompt_ids, max_tokens: int = 256, sampling: SamplingParams | None = None,
           stop_ids=None, prefill_chunk: int = 256, cache: PrefixCache | None = None,
           top_logprobs: int = 0, should_stop: Callable[[], bool] | None = None,
           result: Result | None = None) -> Iterator[Token]:
    """Yield generated tokens one by one.  `result`, if given, is filled with usage and timings at the end
    (also when the consumer stops early or `should_stop()` turns true, e.g. on a client disconnect)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty: at least one token (normally BOS) is needed")
    model.check_length(len(prompt))
    if stop_ids is None:
        stop_ids = [model.config.eos_token_id]
    stop = {int(stop_ids)} if isinstance(stop_ids, (int, np.integer)) else {int(t) for t in stop_ids}
    sampler = Sampler(sampling)
    res = result if result is not None else Result([], "length", len(prompt), 0, 0.0, 0.0)
    res.prompt_tokens = len(prompt)

    t0 = time.perf_counter()
    hit = cache.lookup(prompt[:-1]) if cache else None      # always re-feed ≥ 1 token to get logits
    state, done = (model.fork_state(hit[1]), len(hit[0])) if hit else (model.new_state(1), 0)
    res.cached_tokens = done
    logits, state = _prefill(model, state, prompt[done:], prefill_chunk)
    res.prefill_s = time.perf_counter() - t0
    fed = list(prompt)
    budget = min(max_tokens, model.context - len(prompt))
    t1 = time.perf_counter()
    try:
        for n in range(budget):
            tok = sampler(logits, fed)
            lp = log_softmax(logits)
            top = []
            if top_logprobs:
                order = np.argsort(-lp, kind="stable")[:top_logprobs]
                top = [(int(i), float(lp[i])) for i in order]
            res.tokens.append(tok)
            res.logprobs.append(float(lp[tok]))
            yield Token(tok, float(lp[tok]), top)
            if tok in stop:
                res.finish_reason = "stop"
                break
            if n + 1 == budget or (should_stop and should_stop()):
                break
            logits, state = model.step(state, np.asarray([[tok]], dtype=np.int64))
            logits = logits[0, -1]
            fed.append(tok)
    finally:
        res.decode_s = time.perf_counter() - t1
        if cache is not None:
            cache.store(fed, state)


def generate(model, prompt_ids, **kw) -> Result:
    """Run `stream` to completion and return the tokens with usage and timings."""
    res = Result([], "length", 0, 0, 0.0, 0.0)
    for _ in stream(model, prompt_ids, result=res, **kw):
        pass
    return res

"""The scheduler: one thread owns the model; HTTP handlers only submit jobs and read their events.

Why a thread: a model step is long blocking NumPy/torch work, and a backend's state must be touched by
one thread at a time.  The event loop stays free to accept requests, stream chunks and notice
disconnects; it talks to the scheduler through `Job` objects (in) and the job's `emit` callback (out).

Each scheduler turn (1) drops cancelled jobs, (2) runs one prefill chunk of the oldest job still
prefilling, (3) runs one decode step for every job that is generating.  A long prompt therefore delays
the running streams by at most one chunk, and new jobs start while others are mid-stream.

Batching: when the runner can stack and split states (`runner.stack` / `runner.split`), the decode
steps of all generating jobs are one [B,1] step on a stacked state.  Rows may sit at different positions
because the graph derives positions from the per-row `start`.  The stacked state is rebuilt only when
the set of generating jobs changes; stacking and splitting copy the rows held (states are sized to
their tokens, not to the context).  A runner without them is stepped one job at a time.  Prefill stays
per job: prompts differ in length, and a [1,S] chunk is already a matrix-matrix product.

Prefix reuse: the `PrefixCache` holds (token ids → (state, next-token logits)) snapshots taken when a
prompt is fully read (a fork, since the job goes on updating its state in place) and when a job ends.
A job looks the cache up on its first prefill turn (not at admission), so identical prompts submitted
together reuse the first one's work, from a fork of the snapshot; an identical prompt needs no model
step at all, an extension feeds only its new tokens.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dsv4.portable.generate import PrefixCache, Token
from dsv4.portable.sampling import Sampler, SamplingParams, log_softmax

log = logging.getLogger("dsv4.serve")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the HTTP layer answers 429."""


def describe(error: Exception) -> str:
    """What a client is told about a failed step: the message of a ValueError or of dsv4's own errors
    (written for users: "the model produced NaN or Inf logits ..."), nothing of any other exception,
    whose text is an internal detail (the log has the traceback)."""
    if isinstance(error, ValueError) or type(error).__module__.startswith("dsv4."):
        return str(error) or type(error).__name__
    return "internal error (the server log has the details)"


@dataclass(frozen=True)
class Finished:
    """Last event of a job.  reason: "stop" (a stop id), "length", "cancelled" or "error"."""
    reason: str
    completion_tokens: int
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One generation request.  `emit` is called from the scheduler thread with each `Token`, then
    one `Finished`; it must be cheap and thread-safe (the server hands events to its event loop)."""
    prompt: list
    max_tokens: int
    emit: Callable[[object], None]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    top_logprobs: int = 0
    cancelled: bool = False
    cached_tokens: int = 0          # prompt tokens served from the prefix cache (set before the first token)
    # Scheduler-owned from here on.
    tokens: list = field(default_factory=list)     # ids already in the state
    state: object = None                            # None while the job's row lives in the stacked state
    logits: object = None                           # next-token logits after `tokens`
    pending: int | None = None                      # sampled id still to be fed (the job is decoding)
    generated: int = 0
    sampler: Sampler | None = None
    started: bool = False

    def cancel(self) -> None:
        """Ask the scheduler to drop this job at its next turn (safe from any thread)."""
        self.cancelled = True


class Engine:
    """Owns `model` on a scheduler thread.  `model` needs `context`, `new_state(1)`, `step(state, ids)`,
    `fork_state(state)` and, for batching, `runner.stack(states)` / `runner.split(state)`."""

    def __init__(self, model, max_queue: int = 64, max_batch: int = 8, prefill_chunk: int = 256,
                 cache_size: int = 8):
        if max_queue < 1 or max_batch < 1 or prefill_chunk < 1 or cache_size < 0:
            raise ValueError("max_queue, max_batch and prefill_chunk must be ≥ 1 and cache_size ≥ 0")
        self.model = model
        self.max_queue, self.max_batch, self.prefill_chunk = max_queue, max_batch, prefill_chunk
        self.cache = PrefixCache(cache_size) if cache_size else None
        runner = getattr(model, "runner", None)
        batchable = all(hasattr(runner, f) for f in ("stack", "split"))
        self._runner = runner if batchable and max_batch > 1 else None
        self._waiting: collections.deque = collections.deque()
        self._running: list = []
        self._group = None                      # (members, stacked state) of the last batched step
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.decode_steps = 0
        self.decode_rows = 0

    @property
    def batching(self) -> bool:
        return self._runner is not None

    # ------------------------------------------------------------ public, any thread
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="dsv4-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if not job.prompt:
            raise ValueError("the prompt is empty")
        if job.max_tokens < 1 or len(job.prompt) + job.max_tokens > self.model.context:
            raise ValueError(f"{len(job.prompt)} prompt tokens + max_tokens {job.max_tokens} do not fit "
                             f"the context of {self.model.context}")
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(job)
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting), "batching": self.batching,
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "decode_steps": self.decode_steps, "decode_rows": self.decode_rows}

    # ------------------------------------------------------------ scheduler thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._running):
                    self._cv.wait()
                if self._stopping:
                    break
                while self._waiting and len(self._running) < self.max_batch:
                    self._running.append(self._waiting.popleft())
            self._turn()
        for job in list(self._running) + list(self._waiting):
            self._finish(job, "cancelled")

    def _turn(self) -> None:
        for job in [j for j in self._running if j.cancelled]:
            self._finish(job, "cancelled")
        prefilling = [j for j in self._running if j.pending is None]
        if prefilling:
            job = prefilling[0]
            try:
                self._prefill_chunk(job)
            except Exception as e:  # a bad job must not take the scheduler down
                log.exception("prefill failed")
                self._finish(job, "error", describe(e))
        decoding = [j for j in self._running if j.pending is not None]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as e:
                log.exception("decode step failed")
                self._group = None
                for job in decoding:
                    job.state = None
                    self._finish(job, "error", describe(e))

    def _prefill_chunk(self, job: Job) -> None:
        if not job.started:
            job.started = True
            job.sampler = Sampler(job.sampling)
            hit = self.cache.lookup(job.prompt) if self.cache else None
            if hit:
                job.tokens = list(hit[0])
                state, job.logits = hit[1]
                job.state = self.model.fork_state(state)
            else:
                job.state = self.model.new_state(1)
            job.cached_tokens = len(job.tokens)
        todo = job.prompt[len(job.tokens):len(job.tokens) + self.prefill_chunk]
        if todo:
            logits, job.state = self.model.step(job.state, np.asarray([todo], dtype=np.int64))
            job.logits = logits[0, -1]
            job.tokens.extend(todo)
        if len(job.tokens) == len(job.prompt):
            if self.cache is not None and job.cached_tokens < len(job.prompt):
                self.cache.store(job.prompt, (self.model.fork_state(job.state), job.logits))
            self._sample(job)

    def _decode(self, jobs: list) -> None:
        self.decode_steps += 1
        self.decode_rows += len(jobs)
        if self._runner is None:
            for job in jobs:
                logits, job.state = self.model.step(job.state, np.asarray([[job.pending]], dtype=np.int64))
                self._advance(job, logits[0, -1])
            return
        if self._group is None or self._group[0] != jobs:
            self._split_group()
            stacked = self._runner.stack([j.state for j in jobs])
            for job in jobs:
                job.state = None
            self._group = (list(jobs), stacked)
        members, state = self._group
        logits, state = self.model.step(state, np.asarray([[j.pending] for j in members], dtype=np.int64))
        self._group = (members, state)
        for i, job in enumerate(members):
            self._advance(job, logits[i, -1])

    def _split_group(self) -> None:
        """Give every member of the stacked state its own batch-1 state back."""
        if self._group is None:
            return
        members, state = self._group
        self._group = None
        for job, row in zip(members, self._runner.split(state)):
            job.state = row

    def _advance(self, job: Job, logits) -> None:
        job.tokens.append(job.pending)
        job.pending = None
        job.logits = logits
        self._sample(job)

    def _sample(self, job: Job) -> None:
        tok = job.sampler(job.logits, job.tokens)
        lp = log_softmax(np.asarray(job.logits, dtype=np.float64))
        top = []
        if job.top_logprobs:
            top = [(int(i), float(lp[i])) for i in np.argsort(-lp, kind="stable")[:job.top_logprobs]]
        job.generated += 1
        self._emit(job, Token(tok, float(lp[tok]), top))
        if tok in job.stop_ids:
            self._finish(job, "stop")
        elif job.generated >= job.max_tokens:
            self._finish(job, "length")
        elif job.cancelled:
            self._finish(job, "cancelled")
        else:
            job.pending = tok

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        if self._group is not None and any(m is job for m in self._group[0]):
            self._split_group()
        if self.cache is not None and job.state is not None and job.generated and reason != "error":
            self.cache.store(job.tokens, (job.state, job.logits))
        job.state = job.logits = None
        with self._cv:
            if job in self._running:
                self._running.remove(job)
        self._emit(job, Finished(reason, job.generated, error))

    @staticmethod
    def _emit(job: Job, event) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiving side is gone (closed loop); the job still ends cleanly
            log.debug("could not deliver an event", exc_info=True)

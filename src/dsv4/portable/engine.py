"""The generation engine: one scheduler behind `Model.generate/stream/generate_batch`, the chat REPL and
the HTTP server.  It owns chunked prefill, batched decode, sampling + logprobs (`sampling.Sampler`),
stop ids, a constraint's end, n > 1 (forks of one prefill) and the prefix cache; `StopMatcher` and
`TextStream` turn its token ids into text cut at stop strings and parsed into reasoning / content /
tool calls, the same way for every front end.

Two ways to drive it.  `Engine(model).start()` runs it on its own thread (the server: a model step is
long blocking work, and a backend's state must be touched by one thread at a time); callers `submit`
jobs from any thread and receive events through the job's `emit`.  Without `start`, the caller drives
it: `turn()` runs one scheduler turn on the calling thread while `busy` (`portable.generate` does this;
so does the chat REPL, through it).  Python users batch with either:

    engine = Engine(model, max_batch=4)
    jobs = [Job(prompt=ids, max_tokens=32, emit=events.append) for ids in prompts]
    for job in jobs: engine.submit(job)
    while engine.busy: engine.turn()

or `model.generate_batch(prompts, max_tokens=32)`, which does exactly that.

Each turn (1) admits waiting jobs up to `max_batch`, (2) drops cancelled jobs, (3) runs one prefill
chunk (`prefill_chunk` tokens, the engine's setting) of the oldest job still prefilling, (4) runs one
decode step for every job that is generating.  A long prompt therefore delays the running streams by at
most one chunk, and new jobs start while others are mid-stream.

Batching: when the runner can stack and split states (`runner.stack` / `runner.split`), the decode
steps of all generating jobs are one [B,1] step on a stacked state.  Rows may sit at different positions
because the graph derives positions from the per-row `start`.  The stacked state is rebuilt only when
the set of generating jobs changes; stacking and splitting copy the rows held (states are sized to
their tokens, not to the context).  A runner without them is stepped one job at a time.  Prefill stays
per job: prompts differ in length, and a [1,S] chunk is already a matrix-matrix product.

n > 1: a job's `forks` (jobs with the same prompt, e.g. the other choices of one request) are not
prefilled: when the job has read its prompt, each fork starts from `model.fork_state` of its state and
its next-token logits, samples with its own random stream (`Sampler(stream=job.index)`), and joins the
batch (which may then exceed `max_batch` by the forks).  A job that ends before that ends its forks the
same way.

Constraints: a job's `constraint` (see `sampling`) masks every sampled token and is advanced with it;
when it reports `finished` the job ends with reason "stop".

Speculative decoding: a job with `draft_tokens` k > 0 keeps an MTP state beside its state (fed during
prefill) and decodes in rounds (`speculative`): the MTP block drafts k tokens, one [B, k+1] step verifies
them, the rows of rejected tokens are undone, and the kept tokens are delivered one by one with the same
stop/length/cancel checks as a sampled token, so the job ends at the token plain decoding would end at.
Drafting jobs are batched among themselves (stacked main and MTP states), plain jobs among themselves.

Prefix reuse: the `PrefixCache` holds (token ids → state, next-token logits) snapshots taken when a
prompt is fully read (a fork, since the job goes on updating its state in place), at `snapshot_at`
prompt tokens when a job asks for it (the chat REPL: see `cli.session`), and when a job ends.  A job
looks the cache up on its first prefill turn (not at admission), so identical prompts submitted together
reuse the first one's work, from a fork of the snapshot; an identical prompt needs no model step at all,
an extension feeds only its new tokens.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import speculative
from .encoding import ContentDelta, IncrementalDetokenizer, StreamParser
from .sampling import Sampler, SamplingParams

log = logging.getLogger("dsv4.engine")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the HTTP layer answers 429."""


def describe(error: Exception) -> str:
    """What a client is told about a failed step: the message of a ValueError or of dsv4's own errors
    (written for users: "the model produced NaN or Inf logits ..."), nothing of any other exception,
    whose text is an internal detail (the log has the traceback)."""
    if isinstance(error, ValueError) or type(error).__module__.startswith("dsv4."):
        return str(error) or type(error).__name__
    return "internal error (the server log has the details)"


@dataclass
class Usage:
    """Token counts and timings of one generation, with the rates every front end prints."""
    prompt_tokens: int = 0
    cached_tokens: int = 0            # prompt tokens served from the prefix cache
    completion_tokens: int = 0
    prefill_s: float = 0.0            # submission to the first token
    decode_s: float = 0.0             # first token to the last
    drafted: int = 0                  # tokens the MTP block drafted (speculative decoding)
    accepted: int = 0                 # drafted tokens the main model kept

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first (which came with the prefill); None below two tokens."""
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass(frozen=True)
class Finished:
    """Last event of a job.  reason: "stop" (a stop id, or the constraint ended), "length", "cancelled"
    or "error"."""
    reason: str
    completion_tokens: int
    error: str | None = None          # what a client is told (`describe`)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    exception: Exception | None = field(default=None, compare=False, repr=False)   # for in-process callers
    drafted: int = 0
    accepted: int = 0


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
    constraint: object = None       # masks and ends the output (see `sampling`)
    forks: list = field(default_factory=list)   # jobs with this prompt that start from its prefill (n > 1)
    index: int = 0                  # the choice this job is (its sampler's random stream)
    snapshot_at: int | None = None  # also cache the state after this many prompt tokens
    draft_tokens: int | None = None  # MTP drafts per decode step (None: the model's default; 0: off)
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
    submitted_at: float = 0.0
    first_token_at: float | None = None
    mtp: object = None                              # the MTP block's state (drafting jobs)
    mtp_h: object = None                            # main streams the MTP block has still to read
    probing: bool = False                           # drafting by default: stops if drafts fail
    drafted: int = 0
    accepted: int = 0

    def cancel(self) -> None:
        """Ask the scheduler to drop this job at its next turn (safe from any thread)."""
        self.cancelled = True


class PrefixCache:
    """Keeps (token ids → state, next-token logits) snapshots; `lookup` returns the longest one that
    prefixes a prompt.  A stored state belongs to the cache: resume from `model.fork_state` of it.

    `disk` (a `prompt_store.StateStore`) is a second tier that survives restarts: every snapshot is also
    saved there, and a lookup restores a saved prefix longer than any held in memory (and keeps it).

    A snapshot of a drafting job also keeps its MTP state and the streams that state still owes
    (`mtp`), so a job resuming it drafts as well as the one that stored it (memory tier only)."""

    def __init__(self, capacity: int = 8, disk=None):
        self.capacity, self.disk = capacity, disk
        self._items: list = []
        self._mtp: dict = {}                    # tuple(token ids) → (MTP state, owed streams)

    def lookup(self, ids):
        """(tokens, state, logits) of the longest snapshot whose tokens prefix `ids`, or None."""
        best = None
        for item in self._items:
            n = len(item[0])
            if n <= len(ids) and (best is None or n > len(best[0])) and list(ids[:n]) == item[0]:
                best = item
        if self.disk is not None:
            restored = self.disk.restore(ids, longer_than=len(best[0]) if best else 0)
            if restored is not None:
                n, state, logits = restored
                best = (list(ids[:n]), state, logits)
                self._keep(best)
        return best

    def store(self, ids, state, logits, mtp=None) -> None:
        self._keep((list(ids), state, logits), mtp)
        if self.disk is not None:
            self.disk.save(ids, state, logits)

    def mtp(self, ids):
        """(MTP state, owed streams) stored with the snapshot of exactly `ids`, or None; the state
        belongs to the cache (resume from a fork)."""
        return self._mtp.get(tuple(ids))

    def _keep(self, item, mtp=None) -> None:
        self._items = [it for it in self._items if it[0] != item[0]]
        self._items.append(item)
        del self._items[:max(0, len(self._items) - self.capacity)]
        key = tuple(item[0])
        self._mtp.pop(key, None)
        if mtp is not None:
            self._mtp[key] = mtp
        held = {tuple(it[0]) for it in self._items}
        self._mtp = {k: v for k, v in self._mtp.items() if k in held}


def prefill(model, state, ids, chunk: int):
    """Feed `ids` to `state` in chunks of `chunk` tokens; (next-token logits, state)."""
    logits = None
    for a in range(0, len(ids), chunk):
        logits, state = model.step(state, np.asarray([ids[a:a + chunk]], dtype=np.int64))
    return logits[0, -1], state


class Engine:
    """Schedules jobs on `model` (see module docstring).  `model` needs `context`, `new_state(1)`,
    `step(state, ids)`, `fork_state(state)` and, for batching, `runner.stack(states)` / `runner.split`."""

    def __init__(self, model, max_queue: int = 64, max_batch: int = 8, prefill_chunk: int = 256,
                 cache: PrefixCache | None = None, draft_tokens: int | None = None):
        """`draft_tokens`: MTP drafts per decode step of the jobs that do not set their own (None: the
        model's default, `speculative.default_draft_tokens`)."""
        if max_queue < 1 or max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_queue, max_batch and prefill_chunk must be ≥ 1")
        self.model = model
        self.draft_tokens = None if draft_tokens is None else speculative.check_draft_tokens(draft_tokens)
        self.max_queue, self.max_batch, self.prefill_chunk = max_queue, max_batch, prefill_chunk
        self.cache = cache
        runner = getattr(model, "runner", None)
        batchable = all(hasattr(runner, f) for f in ("stack", "split"))
        self._runner = runner if batchable and max_batch > 1 else None
        self._waiting: collections.deque = collections.deque()
        self._running: list = []
        self._group = None                      # (members, stacked state) of the last batched step
        self._sgroup = None                     # (members, stacked state, stacked MTP state): drafting jobs
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.decode_steps = 0
        self.decode_rows = 0
        self.prefill_steps = 0
        self.verify_steps = 0                   # decode steps of drafting jobs (one per round)

    @property
    def batching(self) -> bool:
        return self._runner is not None

    @property
    def busy(self) -> bool:
        """Jobs are waiting or running (a caller-driven engine runs `turn()` while this holds)."""
        with self._cv:
            return bool(self._waiting or self._running)

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
        """Queue `job` (its forks come with it); ValueError when it cannot run, QueueFull at the bound."""
        if not job.prompt:
            raise ValueError("the prompt is empty")
        if job.max_tokens < 1 or len(job.prompt) + job.max_tokens > self.model.context:
            raise ValueError(f"{len(job.prompt)} prompt tokens + max_tokens {job.max_tokens} do not fit "
                             f"the context of {self.model.context}")
        if any(f.prompt != job.prompt or f.forks for f in job.forks):
            raise ValueError("a job's forks must have its prompt and no forks of their own")
        for j in (job, *job.forks):
            j.draft_tokens = self._drafts(j)
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            now = time.perf_counter()
            for j in (job, *job.forks):
                j.submitted_at = now
            self._waiting.append(job)
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting), "batching": self.batching,
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "decode_steps": self.decode_steps, "decode_rows": self.decode_rows,
                    "prefill_steps": self.prefill_steps, "verify_steps": self.verify_steps}

    def _drafts(self, job: Job) -> int:
        """The drafts per step `job` runs with: its own setting, the engine's, or for a greedy job the
        model's default (then `probing`: see `speculative.keeps_drafting`); 0 with a constraint (its
        mask would have to follow every draft); refused beyond the model's means.  A sampled job drafts
        only when asked: its tokens follow plain sampling's distribution, but which ones a seed gives
        depends on the drafts, so by default a seed keeps giving the answer it gave without drafting."""
        k = job.draft_tokens if job.draft_tokens is not None else self.draft_tokens
        if k is None:
            job.probing = True
            greedy = job.sampling.temperature == 0 and job.constraint is None
            return getattr(self.model, "default_draft_tokens", 0) if greedy else 0
        k = speculative.check_draft_tokens(k, self.model)
        return 0 if job.constraint is not None else k

    # ------------------------------------------------------------ the scheduler
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._running):
                    self._cv.wait()
                if self._stopping:
                    break
            self.turn()
        for job in list(self._running) + list(self._waiting):
            self._finish(job, "cancelled")

    def turn(self) -> None:
        """One scheduler turn (module docstring); on the scheduler thread, or the caller's if not started."""
        with self._cv:
            while self._waiting and len(self._running) < self.max_batch:
                self._running.append(self._waiting.popleft())
        for job in [j for j in self._running if j.cancelled]:
            self._finish(job, "cancelled")
        prefilling = [j for j in self._running if j.pending is None]
        if prefilling:
            job = prefilling[0]
            try:
                self._prefill_chunk(job)
            except Exception as e:  # a bad job must not take the scheduler down
                self._fail(job, e, "prefill failed")
        decoding = [j for j in self._running if j.pending is not None]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as e:
                self._group = self._sgroup = None
                for job in decoding:
                    job.state = job.mtp = None
                    self._fail(job, e, "decode step failed")

    def _prefill_chunk(self, job: Job) -> None:
        if not job.started:
            job.started = True
            job.sampler = Sampler(job.sampling, job.index)
            hit = self.cache.lookup(job.prompt) if self.cache is not None else None
            if hit:
                job.tokens, state, job.logits = list(hit[0]), hit[1], hit[2]
                job.state = self.model.fork_state(state)
            else:
                job.state = self.model.new_state(1)
            job.cached_tokens = len(job.tokens)
            if job.draft_tokens:
                kept = self.cache.mtp(job.tokens) if hit else None
                if kept is not None:
                    job.mtp, job.mtp_h = self.model.fork_state(kept[0]), kept[1]
                else:
                    # A snapshot without an MTP state (from the disk tier, or a job that did not draft):
                    # the MTP block starts at the first token it gets streams for (its window misses the
                    # cached prefix: weaker drafts, the same output).
                    job.mtp = self.model.new_mtp_state(1)
                    if job.tokens:
                        self.model.runner.set_start(job.mtp, np.asarray([len(job.tokens)]))
        end = len(job.prompt)
        if job.snapshot_at is not None and len(job.tokens) < job.snapshot_at:
            end = job.snapshot_at
        todo = job.prompt[len(job.tokens):min(end, len(job.tokens) + self.prefill_chunk)]
        if todo:
            if job.mtp is not None:
                owed = 0 if job.mtp_h is None else job.mtp_h.shape[1]
                job.logits, job.mtp_h = speculative.prefill(self.model, job.state, job.mtp, todo,
                                                            self.prefill_chunk, job.mtp_h,
                                                            job.tokens[len(job.tokens) - owed + 1:] if owed else [])
            else:
                job.logits, job.state = prefill(self.model, job.state, todo, self.prefill_chunk)
            job.tokens.extend(todo)
            self.prefill_steps += 1
            if len(job.tokens) == job.snapshot_at and self.cache is not None:
                self.cache.store(job.tokens, self.model.fork_state(job.state), job.logits, self._mtp_copy(job))
        if len(job.tokens) == len(job.prompt):
            if self.cache is not None and job.cached_tokens < len(job.prompt):
                self.cache.store(job.prompt, self.model.fork_state(job.state), job.logits, self._mtp_copy(job))
            self._start_forks(job)          # before the job samples: that may end it and release its state
            self._sample(job)

    def _mtp_copy(self, job: Job):
        """What the prefix cache keeps of a drafting job's MTP side (a fork: the job goes on)."""
        return None if job.mtp is None else (self.model.fork_state(job.mtp), job.mtp_h)

    def _start_forks(self, job: Job) -> None:
        """The forks start from this job's prefill (module docstring: n > 1)."""
        forks, job.forks = job.forks, []
        for fork in forks:
            fork.started = True
            fork.sampler = Sampler(fork.sampling, fork.index)
            fork.tokens, fork.logits, fork.cached_tokens = list(job.tokens), job.logits, job.cached_tokens
            fork.state = self.model.fork_state(job.state)
            if job.mtp is not None and fork.draft_tokens:
                fork.mtp, fork.mtp_h = self.model.fork_state(job.mtp), job.mtp_h
            else:
                fork.draft_tokens = 0
            with self._cv:
                self._running.append(fork)
            self._sample(fork)

    def _decode(self, jobs: list) -> None:
        self.decode_steps += 1
        self.decode_rows += len(jobs)
        plain = [j for j in jobs if not j.draft_tokens]
        drafting = [j for j in jobs if j.draft_tokens]
        if self._sgroup is not None and self._sgroup[0] != drafting:
            self._split_drafting()
        for job in plain:                   # a job may have stopped drafting (`speculative.keeps_drafting`)
            job.mtp = job.mtp_h = None
        if drafting:
            self._decode_drafting(drafting)
        if plain:
            self._decode_plain(plain)

    def _decode_plain(self, jobs: list) -> None:
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

    def _split_drafting(self) -> None:
        """The same for the drafting jobs' stacked main and MTP states."""
        if self._sgroup is None:
            return
        members, state, mtp = self._sgroup
        self._sgroup = None
        for job, row, mrow in zip(members, self._runner.split(state), self._runner.split(mtp)):
            job.state, job.mtp = row, mrow

    def _decode_drafting(self, jobs: list) -> None:
        """One speculative round (`portable.speculative`) for the drafting jobs: batched on stacked
        main and MTP states like plain decode, else one job at a time."""
        if self._runner is None:
            for job in jobs:
                self._round([job], job.state, job.mtp)
            return
        if self._sgroup is None or self._sgroup[0] != jobs:
            self._split_drafting()
            stacked = (self._runner.stack([j.state for j in jobs]), self._runner.stack([j.mtp for j in jobs]))
            for job in jobs:
                job.state = job.mtp = None
            self._sgroup = (list(jobs), *stacked)
        members, state, mtp = self._sgroup
        self._round(list(members), state, mtp)

    def _round(self, jobs: list, state, mtp) -> None:
        """Draft, verify, undo what is not kept, then deliver each job's new tokens in order; a stop id
        or the token budget met mid-draft ends the job there, as plain decoding would."""
        model, o = self.model, self.model.runner.ops
        self.verify_steps += 1
        room = model.context - max(len(j.tokens) for j in jobs) - 1        # the verify step must fit
        rows = []
        for j in jobs:
            hist = j.tokens + [j.pending]
            m = 0 if j.mtp_h is None else j.mtp_h.shape[1]
            k = max(0, min(j.draft_tokens, j.max_tokens - j.generated - 1, room))
            rows.append(speculative.Row(j.sampler, hist, j.mtp_h, hist[len(hist) - m:], k))
        fed = speculative.draft(model, mtp, rows)
        logits, streams, undo = speculative.verify(model, state, [j.pending for j in jobs], rows)
        plans = []
        for i, (j, r) in enumerate(zip(jobs, rows)):
            new = speculative.accept(r, logits[i])
            take = []
            for t in new:
                take.append(t)
                if t in j.stop_ids or j.generated + len(take) >= j.max_tokens:
                    break
            plans.append((new, take))
        undo.restore(model.runner, state, [len(t) for _, t in plans])     # pending + all but the last
        for i, (j, r, (new, take)) in enumerate(zip(jobs, rows, plans)):
            j.drafted += len(r.drafts)
            j.accepted += min(len(new) - 1, len(take))
            h = streams[i:i + 1, :len(take)]
            j.mtp_h = h if fed or j.mtp_h is None else o.concat([j.mtp_h, h], 1)
            j.tokens.append(j.pending)
            j.tokens.extend(take[:-1])
            j.pending = None
            j.logits = np.array(logits[i, len(take) - 1])
            if j.probing and not speculative.keeps_drafting(j.drafted, j.accepted):
                j.draft_tokens = 0
        for i, (j, (new, take)) in enumerate(zip(jobs, plans)):
            for n, t in enumerate(take):
                j.sampler.commit(t)
                if not self._deliver(j, j.sampler.report(t, logits[i, n], j.top_logprobs)):
                    break
            else:
                j.pending = take[-1]

    def _advance(self, job: Job, logits) -> None:
        job.tokens.append(job.pending)
        job.pending = None
        job.logits = logits
        self._sample(job)

    def _sample(self, job: Job) -> None:
        try:
            token = job.sampler.token(job.logits, job.tokens, job.constraint, job.top_logprobs)
            if job.constraint is not None:
                job.constraint.accept(token.id)
        except Exception as e:
            self._fail(job, e, "sampling failed")
            return
        if self._deliver(job, token):
            job.pending = token.id

    def _deliver(self, job: Job, token) -> bool:
        """Emit one generated token; end the job on a stop id, the constraint's end, the budget or a
        cancel (False), else True: the token is the job's next input."""
        job.generated += 1
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        self._emit(job, token)
        if token.id in job.stop_ids or (job.constraint is not None and job.constraint.finished):
            self._finish(job, "stop")
        elif job.generated >= job.max_tokens:
            self._finish(job, "length")
        elif job.cancelled:
            self._finish(job, "cancelled")
        else:
            return True
        return False

    def _fail(self, job: Job, error: Exception, what: str) -> None:
        """End `job` with an error; logged with its traceback on the scheduler thread only (an in-process
        caller gets the exception itself, through `Finished.exception`)."""
        if self._thread is not None:
            log.error(what, exc_info=error)
        self._finish(job, "error", error)

    def _finish(self, job: Job, reason: str, error: Exception | None = None) -> None:
        if self._group is not None and any(m is job for m in self._group[0]):
            self._split_group()
        if self._sgroup is not None and any(m is job for m in self._sgroup[0]):
            self._split_drafting()
        if (self.cache is not None and job.state is not None and reason != "error"
                and len(job.tokens) > job.cached_tokens):
            self.cache.store(job.tokens, job.state, job.logits,
                             None if job.mtp is None else (job.mtp, job.mtp_h))
        job.state = job.logits = job.mtp = job.mtp_h = None
        with self._cv:
            if job in self._running:
                self._running.remove(job)
        now = time.perf_counter()
        first = job.first_token_at if job.first_token_at is not None else now
        self._emit(job, Finished(reason, job.generated, describe(error) if error else None,
                                 first - job.submitted_at, now - first, error, job.drafted, job.accepted))
        forks, job.forks = job.forks, []
        for fork in forks:                      # ended before its prompt was read: so do its forks
            self._finish(fork, reason, error)

    @staticmethod
    def _emit(job: Job, event) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiving side is gone (closed loop); the job still ends cleanly
            log.debug("could not deliver an event", exc_info=True)


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


class TextStream:
    """A job's token ids → parsed events: incremental UTF-8-safe text (the end-of-sequence id is not
    text), cut at the first stop string on the raw text (held back while one may still match), then
    split by the tolerant `StreamParser` into reasoning / content / tool calls (so DSML never reaches
    content).  mode "thinking" or "chat" parses the V4 output format; "raw" passes text through as
    content.  After a stop string matched (`stop`), the stream is finished: the caller ends the job."""

    def __init__(self, tokenizer, stops=(), mode: str = "chat"):
        self._eos = tokenizer.eos_id
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops)
        self.parser = StreamParser(mode) if mode in ("thinking", "chat") else None
        self.stop: str | None = None

    def push(self, token_id: int) -> list:
        """Events for one more generated id (none once a stop string matched)."""
        if self.stop is not None or token_id == self._eos:
            return []
        text, self.stop = self._stops.feed(self._detok.push(token_id))
        return self._parse(text) + (self._parse("", final=True) if self.stop is not None else [])

    def finish(self) -> list:
        """The held-back text and the parser's last events, at the end of the generation."""
        if self.stop is not None:
            return []
        text, self.stop = self._stops.feed(self._detok.flush())
        return self._parse(text + ("" if self.stop is not None else self._stops.flush()), final=True)

    def _parse(self, text: str, final: bool = False) -> list:
        if self.parser is None:
            return [ContentDelta(text)] if text else []
        return self.parser.feed(text) + (self.parser.finish() if final else [])

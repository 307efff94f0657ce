"""One conversation with a loaded model: encode, reuse the cached prefix, generate, parse, stop.

Shared by `dsv4 chat` (many turns) and `dsv4 generate` (one turn).  A turn streams parsed events
(`ReasoningDelta`, `ContentDelta`, `ToolCallEvent`) to a callback and returns a `TurnResult`.

Prefix reuse (encoding spec §3.3, §3.10): every turn re-encodes the whole conversation, the canonical
prompt, and the `PrefixCache` resumes from the longest snapshot that prefixes it.  Two snapshots are
kept per turn: the state after the prompt minus its last token, and the state after everything fed
(prompt + generated tokens).  The second one serves the next turn in chat mode when the model's
completion re-tokenizes as generated; the first one always serves it, also in thinking mode where the
previous answer is re-rendered without its reasoning (`<think>` becomes `</think>` right after
`<｜Assistant｜>`, the last token of the previous prompt).

Ctrl-C (`Interrupt`): the first press asks the decode loop to stop after the current token (the state
stays consistent and cached); a second press raises KeyboardInterrupt at once and the cache is dropped.

`stats_line` is the one-line summary both commands print after a turn (the numbers mlx_lm.generate
prints: tokens and rate of the answer and of the prompt, peak memory).  A session's first prefill is
flagged in it: it also pays one-time costs (the reference reads each weight when first used; other
backends compile kernels or steps), so its rate is not the machine's.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..portable.encoding import ContentDelta, IncrementalDetokenizer, ReasoningDelta, StreamParser
from ..portable.generate import PrefixCache, Result, stream
from ..portable.runtime import ContextError
from ..portable.sampling import SamplingParams
from .resolve import human_bytes

MODES = {"chat": ("chat", None), "thinking": ("thinking", "high"), "max": ("thinking", "max")}
FIRST_PREFILL = "first prefill, includes one-time costs such as lazy weight reads"


class Interrupt:
    """SIGINT handling for the duration of one generation (see module docstring)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


class StopStrings:
    """Cuts a text stream at the first of some stop strings, holding back text that may still become one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            self.hit, self._held = True, ""
            return buf[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self._held = ("" if self.hit else self._held), ""
        return out


@dataclass
class TurnResult:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)
    finish_reason: str = "length"          # stop | length | interrupted
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_prefill: bool = False            # the session's first: includes one-time costs
    warnings: list = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first (which came with the prefill); None below two tokens."""
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens}

    def timings(self) -> dict:
        rate = self.decode_tok_s
        return {"prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "prefill_tok_s": round(self.prefill_tok_s, 2),
                "decode_tok_s": None if rate is None else round(rate, 2), "first_prefill": self.first_prefill}


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark (mapped weights count once touched)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)      # bytes on macOS, KiB on Linux


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def stats_line(res: TurnResult, model, context_used: int) -> str:
    """`12 tokens · 30.5 tok/s · prompt 40 tokens, 24 cached, in 0.31 s (51.6 tok/s) · peak RSS 410.2 MiB
    · context 52/4096 · length · reference/float32` (no decode rate below two tokens)."""
    answer = [count(res.completion_tokens, "token")]
    if res.decode_tok_s is not None:
        answer.append(f"{res.decode_tok_s:.1f} tok/s")
    cached = f", {res.cached_tokens} cached," if res.cached_tokens else ""
    warm = f"; {FIRST_PREFILL}" if res.first_prefill else ""
    prompt = (f"prompt {count(res.prompt_tokens, 'token')}{cached} in {res.prefill_s:.2f} s "
              f"({res.prefill_tok_s:.1f} tok/s{warm})")
    return " · ".join([*answer, prompt, f"peak RSS {human_bytes(peak_rss_bytes())}",
                       f"context {context_used}/{model.context}", res.finish_reason, f"{model.backend}/{model.dtype}"])


@dataclass
class SessionStats:
    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    decode_s: float = 0.0

    def add(self, r: TurnResult) -> None:
        self.turns += 1
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.completion_tokens += r.completion_tokens
        self.decode_s += r.decode_s


class ChatSession:
    """Conversation state (system prompt, messages, mode) plus the model's cached prefix states."""

    def __init__(self, model, mode: str = "chat", system: str | None = None, sampling: SamplingParams | None = None,
                 max_tokens: int = 512, stop=(), prefill_chunk: int = 256):
        self.model = model
        self.tokenizer = model.tokenizer
        self.set_mode(mode)
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.prefill_chunk = prefill_chunk
        self.messages: list[dict] = []
        self.cache = PrefixCache(capacity=4)
        self.stats = SessionStats()
        self.last = TurnResult()
        self.context_used = 0
        self.prefilled = False                 # a prefill has run (the first pays one-time costs)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def reset(self) -> None:
        self.messages = []
        self.context_used = 0

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        thinking_mode, effort = MODES[self.mode]
        return self.tokenizer.encode_messages(messages, thinking_mode=thinking_mode, reasoning_effort=effort,
                                              effort_table=self.model.config.encoding)

    # -------------------------------------------------------------------------------- one turn
    def turn(self, user_text: str, on_event=lambda event: None, interrupt: Interrupt | None = None) -> TurnResult:
        """Add the user message, generate the answer (streaming events), record it; returns the result.
        A prompt that leaves no room for an answer raises ContextError; the conversation is then unchanged."""
        messages = self.conversation() + [{"role": "user", "content": user_text}]
        ids = self.prompt_ids(messages)
        if len(ids) >= self.model.context:
            raise ContextError(f"the prompt is {len(ids)} tokens but the context holds {self.model.context}; "
                               f"raise --context (this model allows up to "
                               f"{self.model.config.max_position_embeddings})")
        interrupt = interrupt or Interrupt()
        try:
            res = self._generate(ids, on_event, interrupt)
        except KeyboardInterrupt:
            self.cache = PrefixCache(capacity=4)         # a state may have been cut mid-step
            raise
        if res.finish_reason == "interrupted" and not res.completion_tokens:
            return res                                   # stopped before answering: nothing to record
        self.messages.append({"role": "user", "content": user_text})
        self.messages.append({"role": "assistant", "content": res.content, "reasoning_content": res.reasoning,
                              **({"tool_calls": res.tool_calls} if res.tool_calls else {})})
        self.stats.add(res)
        self.last = res
        self.context_used = res.prompt_tokens + res.completion_tokens
        return res

    def _warm(self, ids: list[int], interrupt: Interrupt) -> int:
        """Snapshot the state after ids[:-1] (see module docstring); returns how many were cached before."""
        head = ids[:-1]
        hit = self.cache.lookup(head)
        state, done = (self.model.fork_state(hit[1]), len(hit[0])) if hit else (self.model.new_state(1), 0)
        cached = done
        while done < len(head) and not interrupt.requested:
            chunk = head[done:done + self.prefill_chunk]
            _, state = self.model.step(state, np.asarray(chunk, dtype=np.int64)[None])
            done += len(chunk)
        if done > cached:
            self.cache.store(head[:done], state)
        return cached

    def _generate(self, ids: list[int], on_event, interrupt: Interrupt) -> TurnResult:
        thinking_mode, _ = MODES[self.mode]
        out = TurnResult(prompt_tokens=len(ids), first_prefill=not self.prefilled)
        self.prefilled = True
        t0 = time.perf_counter()
        out.cached_tokens = self._warm(ids, interrupt)
        if interrupt.requested:                          # Ctrl-C during a long prefill: no answer
            out.finish_reason, out.prefill_s = "interrupted", time.perf_counter() - t0
            return out
        parser = StreamParser(thinking_mode)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = {ReasoningDelta: StopStrings(self.stop), ContentDelta: StopStrings(self.stop)}
        res = Result([], "length", len(ids), 0, 0.0, 0.0)
        first = None

        def emit(events):
            for ev in events:
                if isinstance(ev, (ReasoningDelta, ContentDelta)):
                    text = stops[type(ev)].feed(ev.text)
                    if not text:
                        continue
                    ev = type(ev)(text)
                on_event(ev)

        def should_stop():
            return interrupt.requested or any(s.hit for s in stops.values())

        for tok in stream(self.model, ids, max_tokens=self.max_tokens, sampling=self.sampling,
                          stop_ids=[self.tokenizer.eos_id], prefill_chunk=self.prefill_chunk, cache=self.cache,
                          should_stop=should_stop, result=res):
            first = first or time.perf_counter()
            emit(parser.feed(detok.push(tok.id)))       # embedding padding past the tokenizer: U+FFFD
        emit(parser.feed(detok.flush()) + parser.finish())
        for kind, s in stops.items():
            tail = s.flush()
            if tail:
                on_event(kind(tail))
        msg = parser.message()
        out.reasoning = _cut(msg["reasoning_content"], self.stop)
        out.content = _cut(msg["content"], self.stop)
        out.tool_calls = msg["tool_calls"]
        out.warnings = list(parser.warnings)
        out.completion_tokens = len(res.tokens)
        first = first or time.perf_counter()
        out.prefill_s = first - t0
        out.decode_s = time.perf_counter() - first
        if interrupt.requested:
            out.finish_reason = "interrupted"
        elif any(s.hit for s in stops.values()):
            out.finish_reason = "stop"
        else:
            out.finish_reason = res.finish_reason
        return out


def _cut(text: str, stops) -> str:
    """`text` up to the first stop string (the parser keeps the whole text; the stream was cut there)."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return text[:min(cuts)] if cuts else text


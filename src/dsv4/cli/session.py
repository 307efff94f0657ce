"""One conversation with a loaded model: encode, reuse the cached prefix, generate, parse, stop.

Shared by `dsv4 chat` (many turns) and `dsv4 generate` (one turn).  A turn streams parsed events
(`ReasoningDelta`, `ContentDelta`, `ToolCallEvent`) to a callback and returns a `TurnResult`.

A turn is one job on the generation engine (`portable.engine`, driven through `portable.generate.stream`
on this thread); the engine's `TextStream` cuts the raw output at stop strings and parses it, as the
server does.

Prefix reuse (encoding spec §3.3, §3.10): every turn re-encodes the whole conversation, the canonical
prompt, and the `PrefixCache` resumes from the longest snapshot that prefixes it.  The engine keeps,
per turn, the state after the prompt, after everything fed (prompt + generated tokens) and, asked by
`snapshot_at`, after the prompt minus its last token.  The second one serves the next turn in chat mode when the model's
completion re-tokenizes as generated; the first one always serves it, also in thinking mode where the
previous answer is re-rendered without its reasoning (`<think>` becomes `</think>` right after
`<｜Assistant｜>`, the last token of the previous prompt).

Ctrl-C (`Interrupt`): the first press asks the engine to stop after the current prefill chunk or token
(the state stays consistent and cached); a second press raises KeyboardInterrupt at once and the cache
is dropped.

`stats_line` is the one-line summary both commands print after a turn (the numbers mlx_lm.generate
prints: tokens and rate of the answer and of the prompt, peak memory).  A session's first prefill is
flagged in it: it also pays one-time costs (the reference reads each weight when first used; other
backends compile kernels or steps), so its rate is not the machine's.
"""

from __future__ import annotations

import resource
import signal
import sys
from dataclasses import dataclass, field

from ..portable.engine import PrefixCache, TextStream, Usage
from ..portable.generate import Result, stream
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


@dataclass
class TurnResult(Usage):
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)
    finish_reason: str = "length"          # stop | length | interrupted
    first_prefill: bool = False            # the session's first: includes one-time costs
    warnings: list = field(default_factory=list)

    def usage(self) -> dict:
        out = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
               "cached_tokens": self.cached_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.drafted:
            out.update(drafted_tokens=self.drafted, accepted_tokens=self.accepted)
        return out

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


def stats_line(res: TurnResult, model, context_used: int, drafts: bool = False) -> str:
    """`12 tokens · 30.5 tok/s · prompt 40 tokens, 24 cached, in 0.31 s (51.6 tok/s) · peak RSS 410.2 MiB
    · context 52/4096 · length · reference/float32` (no decode rate below two tokens); with `drafts`
    (the user chose --draft-tokens), `· 7/12 drafts accepted` after the rate."""
    answer = [count(res.completion_tokens, "token")]
    if res.decode_tok_s is not None:
        answer.append(f"{res.decode_tok_s:.1f} tok/s")
    if drafts and res.drafted:                          # asked for with --draft-tokens
        answer.append(f"{res.accepted}/{res.drafted} drafts accepted")
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
                 max_tokens: int = 512, stop=(), prefill_chunk: int = 256, prompt_store=None,
                 draft_tokens: int | None = None):
        """`prompt_store`: a `portable.prompt_store.StateStore`, the prompt cache's tier on disk, which
        keeps snapshots across sessions (`dsv4 chat --prompt-cache`); `draft_tokens`: MTP drafts per
        decode step (`portable.speculative`; None: the model's default)."""
        self.model = model
        self.tokenizer = model.tokenizer
        self.set_mode(mode)
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.prefill_chunk = prefill_chunk
        self.draft_tokens = draft_tokens
        self.messages: list[dict] = []
        self.prompt_store = prompt_store
        self.cache = PrefixCache(capacity=4, disk=prompt_store)
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
            # a state in memory may have been cut mid-step; the disk holds copies of finished snapshots
            self.cache = PrefixCache(capacity=4, disk=self.prompt_store)
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

    def _generate(self, ids: list[int], on_event, interrupt: Interrupt) -> TurnResult:
        thinking_mode, _ = MODES[self.mode]
        out = TurnResult(prompt_tokens=len(ids), first_prefill=not self.prefilled)
        self.prefilled = True
        text = TextStream(self.tokenizer, self.stop, thinking_mode)
        res = Result()

        def emit(events):
            for event in events:
                on_event(event)

        for tok in stream(self.model, ids, max_tokens=self.max_tokens, sampling=self.sampling,
                          stop_ids=[self.tokenizer.eos_id], prefill_chunk=self.prefill_chunk, cache=self.cache,
                          should_stop=lambda: interrupt.requested or text.stop is not None, result=res,
                          snapshot_at=len(ids) - 1, draft_tokens=self.draft_tokens):
            emit(text.push(tok.id))                     # embedding padding past the tokenizer: U+FFFD
        emit(text.finish())
        msg = text.parser.message()
        out.reasoning, out.content, out.tool_calls = msg["reasoning_content"], msg["content"], msg["tool_calls"]
        out.warnings = list(text.parser.warnings)
        out.cached_tokens, out.completion_tokens = res.cached_tokens, len(res.tokens)
        out.prefill_s, out.decode_s = res.prefill_s, res.decode_s
        out.drafted, out.accepted = res.drafted, res.accepted
        if interrupt.requested:
            out.finish_reason = "interrupted"
        elif text.stop is not None:
            out.finish_reason = "stop"
        else:
            out.finish_reason = res.finish_reason
        return out

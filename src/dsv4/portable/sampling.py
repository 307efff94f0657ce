"""Token samplers on NumPy logits: greedy, temperature, top-k, top-p, min-p, repetition, presence and
frequency penalties, logit bias, a constraint's mask, seed; and the logprobs of the sampled token.

Why NumPy on the host: sampling sees one [vocab] row per sequence per step, so moving it to a backend buys
nothing, and one implementation keeps every backend's sampled tokens identical for the same logits and
seed.  Order (as in llama.cpp / HF / vLLM): repetition penalty → presence/frequency penalties → logit bias
→ the constraint's mask → temperature → top-k → min-p → top-p.  Logprobs are those of the model's own
distribution (the raw logits), as OpenAI and vLLM report them.

A constraint (constrained decoding) is any object with `mask()` (a bool array over the model's vocab of
the ids allowed next, or None for no restriction), `accept(token_id)`, a `finished` property and `fork()`;
the sampler only applies its mask, the engine advances it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


# What the sampler runs without NaN or Inf on its way to the probabilities (SamplingParams refuses the
# rest, and the server's validation is this one).  The repetition penalty divides float32 logits: in its
# range, logits below 1e30 (any model's are far below) stay finite, where 1e-310 made them Inf and the
# probabilities NaN.  The temperature divides them in float64, where 1e-320 did the same; MIN_TEMPERATURE
# sits far above that limit because at 1e-4 a logit gap of 0.01 already weighs e^100: a smaller positive
# temperature can only mean greedy, which is spelled 0.
MIN_TEMPERATURE = 1e-4
REPETITION_PENALTY_RANGE = (0.01, 100.0)
PENALTY_RANGE = (-2.0, 2.0)           # presence and frequency penalties (OpenAI's range)
LOGIT_BIAS_RANGE = (-100.0, 100.0)    # OpenAI's: ±100 bans or forces an id
SEED_LIMIT = 2 ** 64                  # seeds are in [0, 2**64), what NumPy's generators take


class SamplingError(ValueError):
    """A sampling parameter the sampler cannot run; `param` names it, and the message starts with it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0     # OpenAI: subtracted once from every id generated so far
    frequency_penalty: float = 0.0    # OpenAI: subtracted per time an id was generated
    logit_bias: tuple = ()            # ((token id, bias), ...) added to the logits

    def __post_init__(self):
        low, high = REPETITION_PENALTY_RANGE
        plow, phigh = PENALTY_RANGE
        blow, bhigh = LOGIT_BIAS_RANGE
        checks = [("temperature", self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf"),
                   f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("top_k", self.top_k >= 0, "must be ≥ 0"),
                  ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
                  ("repetition_penalty", low <= self.repetition_penalty <= high, f"must be in [{low:g}, {high:g}]"),
                  ("presence_penalty", plow <= self.presence_penalty <= phigh, f"must be in [{plow:g}, {phigh:g}]"),
                  ("frequency_penalty", plow <= self.frequency_penalty <= phigh,
                   f"must be in [{plow:g}, {phigh:g}]"),
                  ("logit_bias", all(i >= 0 and blow <= b <= bhigh for i, b in self.logit_bias),
                   f"must map token ids to biases in [{blow:g}, {bhigh:g}]"),
                  ("seed", self.seed is None or 0 <= self.seed < SEED_LIMIT, "must be in [0, 2**64)")]
        for name, ok, why in checks:
            if not ok:
                raise SamplingError(name, f"{name} {why}, got {getattr(self, name)!r}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """CTRL-style penalty on every token id seen so far: positive logits divided, negative multiplied."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(history, dtype=np.int64))
    v = out[seen]
    out[seen] = np.where(v > 0, v / penalty, v * penalty)
    return out


def filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Sampling distribution over the vocab after temperature, top-k, min-p and top-p."""
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x >= kth, x, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.min_p > 0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p * cum[-1])) + 1]
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
    return probs / probs.sum()


def apply_penalties(logits: np.ndarray, counts: dict, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the generated ids (`counts`: id → times generated):
    logit[j] −= counts[j]·frequency + (counts[j] > 0)·presence."""
    if not counts or (presence == 0 and frequency == 0):
        return logits
    out = logits.copy()
    ids = np.fromiter(counts, dtype=np.int64, count=len(counts))
    out[ids] -= np.fromiter(counts.values(), dtype=np.float64, count=len(counts)) * frequency + presence
    return out


def apply_logit_bias(logits: np.ndarray, bias) -> np.ndarray:
    if not bias:
        return logits
    out = logits.copy()
    for token_id, b in bias:
        out[token_id] += b
    return out


def apply_mask(logits: np.ndarray, constraint) -> np.ndarray:
    """Logits of the ids the constraint forbids set to −inf (no constraint, or a None mask: unchanged)."""
    mask = None if constraint is None else constraint.mask()
    if mask is None:
        return logits
    if not mask.any():
        raise ValueError("the output constraint allows no next token")
    return np.where(mask, logits, -np.inf).astype(logits.dtype)


@dataclass
class Token:
    """One generated token as streamed."""
    id: int
    logprob: float
    top_logprobs: list = field(default_factory=list)   # [(id, logprob)] when requested


class Sampler:
    """Stateful sampler for one sequence: owns its RNG, so a seed reproduces the whole continuation, and
    the counts of the ids it produced (the presence/frequency penalties' history).  `stream` > 0 gives
    the i-th of n choices its own random stream derived from the same seed (stream 0 is the seed's own,
    so choice 0 of n equals the n = 1 answer)."""

    def __init__(self, params: SamplingParams | None = None, stream: int = 0):
        self.params = params or SamplingParams()
        seed = self.params.seed
        self.rng = np.random.default_rng(seed if seed is None or stream == 0 else [seed, stream])
        self.counts: dict = {}

    def adjusted(self, logits: np.ndarray, history=(), constraint=None, ahead=()) -> np.ndarray:
        """The logits the filters see: penalties, logit bias and the constraint's mask applied.  `ahead`:
        ids generated after those counted so far (drafts being verified), counted as if committed."""
        p = self.params
        counts = self.counts
        if len(ahead) and (p.presence_penalty or p.frequency_penalty):
            counts = dict(counts)
            for t in ahead:
                counts[int(t)] = counts.get(int(t), 0) + 1
        x = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), history, p.repetition_penalty)
        x = apply_penalties(x, counts, p.presence_penalty, p.frequency_penalty)
        x = apply_logit_bias(x, p.logit_bias)
        return apply_mask(x, constraint)

    def distribution(self, logits: np.ndarray, history=(), ahead=()) -> np.ndarray:
        """The distribution the next id is drawn from (float64 over the vocab; one-hot at the argmax when
        greedy): what speculative decoding compares its drafts with (`portable.speculative`)."""
        x = self.adjusted(logits, history, None, ahead)
        if self.params.temperature == 0:
            probs = np.zeros(x.size)
            probs[int(np.argmax(x))] = 1.0
            return probs
        return filtered_probs(x, self.params)

    def draw(self, probs: np.ndarray) -> int:
        """An id drawn from `probs` with this sampler's random stream (the argmax of a one-hot)."""
        if self.params.temperature == 0:
            return int(np.argmax(probs))
        return int(self.rng.choice(probs.size, p=probs))

    def commit(self, tok: int) -> None:
        """Count `tok` as generated (the presence/frequency penalties' history)."""
        self.counts[tok] = self.counts.get(tok, 0) + 1

    def __call__(self, logits: np.ndarray, history=(), constraint=None) -> int:
        x = self.adjusted(logits, history, constraint)
        if self.params.temperature == 0:
            tok = int(np.argmax(x))
        else:
            probs = filtered_probs(x, self.params)
            tok = int(self.rng.choice(probs.size, p=probs))
        self.commit(tok)
        return tok

    def report(self, tok: int, logits: np.ndarray, top_logprobs: int = 0) -> Token:
        """`tok` with its logprob under the raw `logits` (and the `top_logprobs` likeliest ids)."""
        lp = log_softmax(np.asarray(logits, dtype=np.float64))
        order = np.argsort(-lp, kind="stable")[:top_logprobs] if top_logprobs else []
        top = [(int(i), float(lp[i])) for i in order]
        return Token(tok, float(lp[tok]), top)

    def token(self, logits: np.ndarray, history=(), constraint=None, top_logprobs: int = 0) -> Token:
        """Sample the next id and report it with its logprob (and the `top_logprobs` likeliest ids)."""
        return self.report(self(logits, history, constraint), logits, top_logprobs)

"""Token samplers on NumPy logits: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed.

Why NumPy on the host: sampling sees one [vocab] row per sequence per step, so moving it to a backend buys
nothing, and one implementation keeps every backend's sampled tokens identical for the same logits and
seed.  Order of filters (as in llama.cpp / HF): repetition penalty → temperature → top-k → min-p → top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# What the sampler runs without NaN or Inf on its way to the probabilities (SamplingParams refuses the
# rest, and the server's validation is this one).  The repetition penalty divides float32 logits: in its
# range, logits below 1e30 (any model's are far below) stay finite, where 1e-310 made them Inf and the
# probabilities NaN.  The temperature divides them in float64, where 1e-320 did the same; MIN_TEMPERATURE
# sits far above that limit because at 1e-4 a logit gap of 0.01 already weighs e^100: a smaller positive
# temperature can only mean greedy, which is spelled 0.
MIN_TEMPERATURE = 1e-4
REPETITION_PENALTY_RANGE = (0.01, 100.0)
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

    def __post_init__(self):
        low, high = REPETITION_PENALTY_RANGE
        checks = [("temperature", self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf"),
                   f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("top_k", self.top_k >= 0, "must be ≥ 0"),
                  ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
                  ("repetition_penalty", low <= self.repetition_penalty <= high, f"must be in [{low:g}, {high:g}]"),
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


class Sampler:
    """Stateful sampler for one sequence (owns its RNG so a seed reproduces the whole continuation)."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, history=()) -> int:
        x = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), history, self.params.repetition_penalty)
        if self.params.temperature == 0:
            return int(np.argmax(x))
        probs = filtered_probs(x, self.params)
        return int(self.rng.choice(probs.size, p=probs))

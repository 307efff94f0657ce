"""Samplers (determinism, filters) and the generation loop (greedy == argmax loop, prefix reuse, limits)."""

import numpy as np
import pytest

import dsv4
from dsv4.portable.engine import PrefixCache
from dsv4.portable.generate import generate, stream
from dsv4.portable.sampling import Sampler, SamplingParams, apply_repetition_penalty, filtered_probs


@pytest.fixture
def logits():
    return np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 3


def test_seed_reproduces_and_differs(logits):
    p = SamplingParams(temperature=1.0, seed=123)
    a = [Sampler(p)(logits) for _ in range(1)] + [s for s in (lambda s: [s(logits) for _ in range(20)])(Sampler(p))]
    b = [Sampler(p)(logits) for _ in range(1)] + [s for s in (lambda s: [s(logits) for _ in range(20)])(Sampler(p))]
    c = (lambda s: [s(logits) for _ in range(21)])(Sampler(SamplingParams(temperature=1.0, seed=124)))
    assert a == b and a != c


def test_greedy_and_degenerate_filters_agree(logits):
    best = int(np.argmax(logits))
    assert Sampler()(logits) == best
    assert Sampler(SamplingParams(temperature=0.7, top_k=1, seed=1))(logits) == best
    assert Sampler(SamplingParams(temperature=0.7, top_p=1e-6, seed=1))(logits) == best
    assert Sampler(SamplingParams(temperature=0.7, min_p=0.999, seed=1))(logits) == best


def test_filters_keep_the_right_support(logits):
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=10))
    assert (probs > 0).sum() == 10 and set(np.nonzero(probs)[0]) == set(np.argsort(-logits)[:10])
    full = filtered_probs(logits, SamplingParams(temperature=1.0))
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    order = np.argsort(-full)
    n = (kept > 0).sum()
    assert full[order[:n - 1]].sum() < 0.5 <= full[order[:n]].sum() + 1e-12
    minp = filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.1))
    assert ((minp > 0) == (full >= 0.1 * full.max())).all()


def test_repetition_penalty_pushes_seen_tokens_down(logits):
    seen = [int(np.argmax(logits)), int(np.argmin(logits))]
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out[seen[0]] == pytest.approx(logits[seen[0]] / 2) and out[seen[1]] == pytest.approx(logits[seen[1]] * 2)
    mask = np.ones(logits.size, bool)
    mask[seen] = False
    assert (out[mask] == logits[mask]).all()


def test_bad_sampling_params_are_named():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature must be"):
        SamplingParams(temperature=-1)


def test_greedy_generation_equals_argmax_loop(tiny_dir, rand_ids):
    model = dsv4.load(tiny_dir, dtype="float64", context=256)
    prompt = list(rand_ids(20, seed=8))
    res = generate(model, prompt, max_tokens=16, stop_ids=[])
    ids = list(prompt)
    for _ in range(16):
        ids.append(int(np.argmax(model.forward(np.asarray(ids), full_precision=True)[-1])))
    assert res.tokens == ids[20:]
    assert res.finish_reason == "length" and res.prompt_tokens == 20 and len(res.logprobs) == 16
    assert all(lp <= 0 for lp in res.logprobs)


def test_stop_id_and_streaming(tiny_dir, rand_ids):
    model = dsv4.load(tiny_dir, context=256)
    prompt = list(rand_ids(10, seed=3))
    first = generate(model, prompt, max_tokens=8, stop_ids=[])
    stop = first.tokens[3]
    res = generate(model, prompt, max_tokens=8, stop_ids=[stop])
    assert res.tokens == first.tokens[:first.tokens.index(stop) + 1] and res.finish_reason == "stop"
    toks = [t.id for t in stream(model, prompt, max_tokens=8, stop_ids=[], top_logprobs=3)]
    assert toks == first.tokens


def test_prefix_cache_reuses_state_and_matches(tiny_dir, rand_ids):
    model = dsv4.load(tiny_dir, dtype="float64", context=256)
    cache = PrefixCache()
    turn1 = list(rand_ids(30, seed=1))
    r1 = generate(model, turn1, max_tokens=5, stop_ids=[], cache=cache)
    turn2 = turn1 + r1.tokens + list(rand_ids(7, seed=2))
    r2 = generate(model, turn2, max_tokens=6, stop_ids=[], cache=cache)
    fresh = generate(model, turn2, max_tokens=6, stop_ids=[])
    assert r2.cached_tokens == 34 and fresh.cached_tokens == 0
    assert r2.tokens == fresh.tokens


def test_context_limits(tiny_dir):
    model = dsv4.load(tiny_dir, context=40)
    with pytest.raises(dsv4.ContextError, match="41 tokens exceed this model's context of 40"):
        generate(model, list(range(3, 44)))
    res = generate(model, list(range(3, 38)), max_tokens=100, stop_ids=[])
    assert len(res.tokens) == 5 and res.finish_reason == "length"


def test_generate_batch_raises_a_failed_jobs_error():
    """A step that fails inside the engine reaches the caller of generate_batch as its exception, not as
    an empty result marked "length"."""
    m = dsv4.load("tiny")

    def broken(state, ids, *a, **kw):
        raise RuntimeError("step failed on purpose")
    m.runner.step = broken
    with pytest.raises(RuntimeError, match="on purpose"):
        m.generate_batch([[0, 5, 6], [0, 7]], max_tokens=3)

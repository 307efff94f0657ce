"""Speculative decoding with the MTP block (`portable.speculative`): greedy identity with drafts rejected
at every offset, rollback of the rows a rejected token wrote (window, compressor rings, CSA/HCA entries
and indexer keys), rejection sampling's distribution, stop ids mid-draft, batching and forks."""

import numpy as np
import pytest

import dsv4
from dsv4.portable import speculative
from dsv4.portable.engine import Engine, Job, PrefixCache
from dsv4.portable.generate import Result
from dsv4.portable.sampling import Sampler, SamplingParams

CONTEXT = 512


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return dsv4.load(tiny_dir, backend="reference", dtype="float64", context=CONTEXT)


def plain(model, prompt, n, **kw):
    return model.generate(prompt, max_tokens=n, draft_tokens=0, stop_ids=[], **kw)


class Oracle:
    """Makes the MTP block draft the true greedy continuation `seq` except at the token indices in `wrong`
    (the MTP state itself is still run for real): drafts get accepted or rejected where the test says."""

    def __init__(self, model, seq, wrong):
        self.model, self.seq, self.wrong = model, list(seq), set(wrong)
        self.real = model.mtp_step

    def __call__(self, state, streams, ids_next):
        start = np.asarray(self.model.runner.ops.to_numpy(state.start)).copy()
        logits, h = self.real(state, streams, ids_next)
        out = np.full_like(logits, -5.0)
        for b in range(logits.shape[0]):
            for s in range(logits.shape[1]):
                i = int(start[b]) + s + 2                     # MTP at position p predicts token p + 2
                if i < len(self.seq):
                    tok = self.seq[i] if i not in self.wrong else (self.seq[i] + 1) % 1000 + 3
                    out[b, s, tok] = 5.0
        return out, h


def visible(model, state):
    """Host copies of a state's buffers without the spill rows (scratch, never read)."""
    arrays = model.runner.state_to_numpy(state)
    return {k: (v if k == "start" else v[:, :-1]) for k, v in arrays.items()}


def undone_and_plain(model, ids: list, keep: int):
    """A 4-token step at positions 125..128 undone to `keep` tokens, and the state of feeding only those
    tokens after the same 125."""
    base = model.new_state(1)
    model.step(base, np.asarray([ids[:125]]))
    spec = model.fork_state(base)
    undo = speculative.Undo(model.runner, spec, 4)
    model.step(spec, np.asarray([ids[125:129]]))
    undo.restore(model.runner, spec, [keep])
    want = model.fork_state(base)
    if keep:
        model.step(want, np.asarray([ids[125:125 + keep]]))
    return spec, want


def assert_same_state(model, a, b):
    sa, sb = visible(model, a), visible(model, b)
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        if x.ndim > 1 and x.shape[1] != y.shape[1]:             # a verify step may grow the capacity first
            n = min(x.shape[1], y.shape[1])
            assert not x[:, n:].any() and not y[:, n:].any(), k
            x, y = x[:, :n], y[:, :n]
        assert x.shape == y.shape, k
        np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-11, err_msg=k)
        assert np.array_equal(x == 0, y == 0), k                # no stale row where the plain state has none


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_identity_with_rejections_at_every_offset(ref, rand_ids, monkeypatch, k):
    prompt = list(rand_ids(118, seed=k))
    want = plain(ref, prompt, 24)
    seq = prompt + want.tokens
    wrong = {len(prompt) + 1 + i for i in range(0, 24, 2 + (k % 2))}   # rejections at every offset over the rounds
    monkeypatch.setattr(ref, "mtp_step", Oracle(ref, seq, wrong))
    got = ref.generate(prompt, max_tokens=24, draft_tokens=k, stop_ids=[])
    assert got.tokens == want.tokens
    assert got.drafted > 0 and 0 < got.accepted < got.drafted
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-9)


def test_random_mtp_greedy_identity_and_counts(ref, rand_ids):
    prompt = list(rand_ids(30, seed=7))
    want = plain(ref, prompt, 20)
    got = ref.generate(prompt, max_tokens=20, draft_tokens=2, stop_ids=[])
    assert got.tokens == want.tokens
    assert got.drafted > 0 and got.accepted <= got.drafted


@pytest.mark.parametrize("end", [5, 8, 9, 10, 11, 12, 13])
def test_final_state_equals_the_plain_state_across_window_and_block_boundaries(ref, rand_ids, monkeypatch, end):
    """Prompt of 120 tokens: the rounds cross position 127 (a ratio-4 and a ratio-128 block complete there;
    the 128-token window wraps).  Drafts for tokens 126..129 are wrong, so a rejected token completes those
    blocks; the state left at every end point must be the plain one (rows restored, entries included)."""
    prompt = list(rand_ids(120, seed=3))
    cache_plain, cache_spec = PrefixCache(), PrefixCache()
    want = plain(ref, prompt, end, cache=cache_plain)
    seq = prompt + plain(ref, prompt, 16).tokens
    monkeypatch.setattr(ref, "mtp_step", Oracle(ref, seq, {126, 127, 129}))
    got = ref.generate(prompt, max_tokens=end, draft_tokens=3, stop_ids=[], cache=cache_spec)
    assert got.tokens == want.tokens
    ids = prompt + want.tokens[:-1]
    _, s_plain, _ = cache_plain.lookup(ids)
    _, s_spec, _ = cache_spec.lookup(ids)
    assert_same_state(ref, s_spec, s_plain)


@pytest.mark.parametrize("keep", [0, 1, 2, 3, 4])
def test_undo_restores_rows_of_rejected_tokens(ref, rand_ids, keep):
    """A 4-token step at positions 125..128 (completing ratio-4 block 31 and ratio-128 block 0 at 127,
    wrapping the window) undone to `keep` tokens equals feeding only those tokens."""
    spec, want = undone_and_plain(ref, list(rand_ids(129, seed=11)), keep)
    assert_same_state(ref, spec, want)


def test_a_prefix_cache_hit_resumes_the_mtp_state(ref, rand_ids, monkeypatch):
    """The second answer to a cached prompt drafts exactly what the first drafted (its MTP state and
    owed streams come from the snapshot, not from an empty window)."""
    prompt = list(rand_ids(40, seed=8))
    calls = []
    real = ref.mtp_step

    def spy(state, streams, ids_next):
        logits, h = real(state, streams, ids_next)
        calls.append(np.argmax(logits, -1).tolist())
        return logits, h
    monkeypatch.setattr(ref, "mtp_step", spy)
    cache = PrefixCache()
    first = ref.generate(prompt, max_tokens=6, draft_tokens=2, stop_ids=[], cache=cache)
    assert cache.mtp(prompt) is not None
    drafted_first, calls[:] = calls[1:], []                   # after the prefill call: the rounds
    second = ref.generate(prompt, max_tokens=6, draft_tokens=2, stop_ids=[], cache=cache)
    assert second.cached_tokens == len(prompt) and second.tokens == first.tokens
    assert calls == drafted_first


def test_a_cached_conversation_extended_drafts_on(ref, rand_ids):
    """Turn 2 extends turn 1's cached tokens (the MTP block owes several streams there): same tokens as
    plain decoding from scratch."""
    cache = PrefixCache()
    turn1 = list(rand_ids(30, seed=12))
    r1 = ref.generate(turn1, max_tokens=7, draft_tokens=3, stop_ids=[], cache=cache)
    turn2 = turn1 + r1.tokens + list(rand_ids(9, seed=13))
    r2 = ref.generate(turn2, max_tokens=8, draft_tokens=3, stop_ids=[], cache=cache)
    assert r2.cached_tokens == len(turn1) + len(r1.tokens) - 1
    assert r2.tokens == plain(ref, turn2, 8).tokens


@pytest.mark.parametrize("keep", [0, 2])
def test_undo_restores_deploy_format_entries(tiny_dir, rand_ids, keep):
    """The same with FP8/FP4 entry stores (code bytes and scales are rows like any other)."""
    model = dsv4.load(tiny_dir, backend="reference", dtype="float32", context=CONTEXT, state_format="deploy")
    spec, want = undone_and_plain(model, list(rand_ids(129, seed=14)), keep)
    a, b = visible(model, spec), visible(model, want)
    for k in a:
        n = min(a[k].shape[1], b[k].shape[1]) if a[k].ndim > 1 else None
        x, y = (a[k], b[k]) if n is None else (a[k][:, :n], b[k][:, :n])
        if x.dtype == np.uint8:
            assert np.mean(x != y) < 0.01, k        # FP8/FP4 codes: a last-bit rounding flip at most here and there
            assert np.array_equal(x.any(-1), y.any(-1)), k      # no stale row where the plain state has none
        else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=k)


def test_batched_drafting_matches_plain(ref, rand_ids):
    prompts = [list(rand_ids(n, seed=20 + n)) for n in (9, 40, 17)]
    want = [plain(ref, p, 12).tokens for p in prompts]
    got = ref.generate_batch(prompts, max_tokens=12, draft_tokens=2, stop_ids=[])
    assert [r.tokens for r in got] == want
    assert all(r.drafted > 0 for r in got)


def test_stop_id_mid_draft_ends_at_the_same_token(ref, rand_ids, monkeypatch):
    prompt = list(rand_ids(25, seed=5))
    free = plain(ref, prompt, 16).tokens
    stop = free[6]
    want = ref.generate(prompt, max_tokens=16, draft_tokens=0, stop_ids=[stop])
    monkeypatch.setattr(ref, "mtp_step", Oracle(ref, prompt + free, set()))      # every draft accepted
    got = ref.generate(prompt, max_tokens=16, draft_tokens=3, stop_ids=[stop])
    assert got.tokens == want.tokens and got.finish_reason == want.finish_reason == "stop"
    assert got.completion_tokens == len(want.tokens)
    for n in (1, 5, 7):                                                   # the budget met mid-draft
        assert ref.generate(prompt, max_tokens=n, draft_tokens=3, stop_ids=[]).tokens == free[:n]


def test_stop_string_mid_draft_ends_where_the_consumer_stopped(ref, rand_ids, monkeypatch):
    """A front end's stop string (here: `should_stop` after 5 tokens) lands inside a round of 4 kept
    tokens; what it is given and counted ends at that token, as without drafts."""
    prompt = list(rand_ids(25, seed=6))
    free = plain(ref, prompt, 16).tokens
    monkeypatch.setattr(ref, "mtp_step", Oracle(ref, prompt + free, set()))
    seen, res = [], Result()
    for tok in ref.stream(prompt, max_tokens=16, draft_tokens=3, stop_ids=[], result=res,
                          should_stop=lambda: len(seen) >= 5):
        seen.append(tok.id)
    assert seen == res.tokens == free[:5] and res.completion_tokens == 5


def test_draft_tokens_refused_out_of_range_and_without_mtp(ref, rand_ids):
    with pytest.raises(ValueError, match="draft_tokens must be in 0..7"):
        ref.generate(list(rand_ids(5)), max_tokens=3, draft_tokens=9)

    class NoMtp:
        context, has_mtp = CONTEXT, False
    with pytest.raises(ValueError, match="MTP layer"):
        Engine(NoMtp()).submit(Job(prompt=[1, 2], max_tokens=2, emit=lambda e: None, draft_tokens=1))


# ---------------------------------------------------------------------- the acceptance rule
def _dist(v, seed):
    x = np.random.default_rng(seed).standard_normal(v) * 1.5
    return x


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=1),
                                    SamplingParams(temperature=0.7, top_k=5, seed=2),
                                    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05,
                                                   repetition_penalty=1.3, seed=3)])
@pytest.mark.parametrize("draft_vocab", [None, [1, 2, 4, 7]])
def test_rejection_sampling_gives_the_target_distribution(params, draft_vocab):
    """Exact target: the first kept token must follow p (the target's processed distribution) whatever the
    draft distribution q, also one that a draft vocabulary gives zero outside it (its logits −inf there,
    as `speculative._over_vocab` makes them); the second follows p2 given the first.  Chi-square over 20k
    draws, V = 8."""
    v, n = 8, 20000
    target = np.stack([_dist(v, 10), _dist(v, 11)])
    draft_logits = np.stack([_dist(v, 12), _dist(v, 13)])
    if draft_vocab is not None:
        outside = np.setdiff1d(np.arange(v), draft_vocab)
        draft_logits[:, outside] = -np.inf
    history = [1, 4]
    sampler = Sampler(params)
    p1 = sampler.distribution(target[0], history)
    counts = np.zeros(v)
    pair = np.zeros((v, v))
    for _ in range(n):
        row = speculative.Row(sampler, list(history), None, [], 2)
        for j in range(2):
            q = sampler.distribution(draft_logits[j], history + row.drafts, ahead=row.drafts)
            row.drafts.append(sampler.draw(q))
            row.q.append(q)
        new = speculative.accept(row, np.concatenate([target, target[:1]]))
        counts[new[0]] += 1
        if len(new) > 1:
            pair[new[0], new[1]] += 1
    expected = p1 * n
    live = expected > 0
    assert counts[~live].sum() == 0
    chi2 = (((counts - expected) ** 2)[live] / expected[live]).sum()
    assert chi2 < 30.0, (chi2, counts, expected)          # 7 dof: p ≈ 1e-4
    # second token, given the most frequent first one: p2 with the first in the history
    a = int(np.argmax(counts))
    p2 = sampler.distribution(target[1], history + [a], ahead=[a])
    obs = pair[a]
    m = obs.sum()
    live = p2 * m > 5
    chi2 = (((obs - p2 * m) ** 2)[live] / (p2 * m)[live]).sum()
    assert chi2 < 30.0 + 3 * live.sum()


def test_greedy_acceptance_keeps_exactly_the_argmax_prefix():
    s = Sampler(SamplingParams())
    target = np.eye(6)[[2, 3, 4]] * 3.0
    for drafts, want in [([2, 3], [2, 3, 4]), ([2, 5], [2, 3]), ([1, 3], [2])]:
        row = speculative.Row(s, [0], None, [], 2)
        row.drafts = drafts
        row.q = [np.eye(6)[d] for d in drafts]
        assert speculative.accept(row, target) == want


def test_sampled_tokens_follow_plain_sampling_end_to_end(ref, rand_ids, monkeypatch):
    """600 seeded choices (forks of one prefill) drafting 2 tokens, with MTP drafts that are the greedy
    continuation (so drafts are kept or rejected by chance): the 2nd and 3rd tokens' frequencies must
    match their exact plain-sampling marginals, computed from the model's own logits (chi-square)."""
    params = SamplingParams(temperature=1.0, top_k=3, seed=123)
    prompt = list(rand_ids(8, seed=17))
    seq = prompt + plain(ref, prompt, 4).tokens
    monkeypatch.setattr(ref, "mtp_step", Oracle(ref, seq, set()))

    def dist(ids):
        logits = ref.forward(np.asarray(ids))[-1]
        return Sampler(params).distribution(logits, ids)

    p1 = dist(prompt)
    want2, want3 = np.zeros(1024), np.zeros(1024)
    for a in np.flatnonzero(p1):
        p2 = dist(prompt + [a])
        want2 += p1[a] * p2
        for b in np.flatnonzero(p2):
            want3 += p1[a] * p2[b] * dist(prompt + [a, b])
    out = {}
    n = 600
    jobs = [Job(prompt=prompt, max_tokens=3, emit=lambda e, i=i: out.setdefault(i, []).append(e),
                sampling=params, stop_ids=frozenset(), index=i, draft_tokens=2) for i in range(n)]
    jobs[0].forks = jobs[1:]
    engine = Engine(ref, max_batch=n)
    engine.submit(jobs[0])
    while engine.busy:
        engine.turn()
    toks = [[e.id for e in out[i] if hasattr(e, "id")] for i in range(n)]
    assert all(len(t) == 3 for t in toks)
    assert sum(j.accepted for j in jobs) > 0.2 * n and sum(j.drafted - j.accepted for j in jobs) > 0.2 * n
    for pos, want in ((1, want2), (2, want3)):
        counts = np.bincount([t[pos] for t in toks], minlength=1024).astype(float)
        assert counts[want == 0].sum() == 0
        live = want * n >= 5
        chi2 = (((counts - want * n) ** 2)[live] / (want * n)[live]).sum()
        assert chi2 < 3 * live.sum() + 10, (pos, chi2, live.sum())


def test_drafting_is_refused_where_it_cannot_run(ref):
    """One reason per case, shared by the explicit check (CLI, server, engine) and the default."""
    class Parallel:
        config, has_mtp = ref.config, True
        runner = type("R", (), {"world": 2})()
    assert speculative.check_draft_tokens(0, Parallel()) == 0
    with pytest.raises(ValueError, match="not in a parallel run; use draft_tokens 0"):
        speculative.check_draft_tokens(2, Parallel())
    assert speculative.default_draft_tokens(Parallel()) == 0
    assert speculative.default_draft_tokens(ref) == 2          # tiny: the head is 5 % of its weights
    no_mtp = type("M", (), {"config": ref.config, "has_mtp": False, "runner": ref.runner})()
    with pytest.raises(ValueError, match="--draft-tokens 1: this model has no MTP layer"):
        speculative.check_draft_tokens(1, no_mtp, "--draft-tokens")


@pytest.fixture(scope="module")
def part_vocab(tiny_dir):
    """The tiny model with the head rows of half its ids zeroed, as a model trained on part of the
    vocabulary has them (the demo): its drafts are scored over the other half."""
    m = dsv4.load(tiny_dir, backend="reference", dtype="float64", context=CONTEXT)
    head = np.array(m.runner.weights["head.weight"])
    head[np.random.default_rng(5).permutation(head.shape[0])[:head.shape[0] // 2]] = 0.0
    m.runner.weights._cache["head.weight"] = head
    return m


def test_drafts_are_scored_over_the_live_head_rows(part_vocab, rand_ids):
    live = np.flatnonzero(np.abs(part_vocab.runner.weights["head.weight"]).max(-1) > 0)
    assert np.array_equal(part_vocab.draft_vocab, live) and len(live) == part_vocab.config.vocab_size // 2
    prompt = rand_ids(20, seed=3)
    _, _, streams = part_vocab.step(part_vocab.new_state(1), prompt[None, :-1], with_streams=True)
    a, b = part_vocab.new_mtp_state(1), part_vocab.new_mtp_state(1)
    full = part_vocab.runner.mtp_step(a, streams, prompt[None, 1:])
    drafts, _ = part_vocab.mtp_step(b, streams, prompt[None, 1:])
    assert drafts.shape == (1, 19, len(live))
    assert np.abs(full[..., live] - drafts).max() < 1e-5                # float32 logits of the same rows
    assert np.abs(full).max() > 0.1                                   # not a test on zeros


def test_a_head_with_zero_rows_scores_only_its_live_rows(part_vocab, tiny_dir, rand_ids):
    """`graph.HeadRows`: the logits are those of the full head (zero rows give exact zeros) whether the
    runner skips the zero rows or multiplies them."""
    full = dsv4.load(tiny_dir, backend="reference", dtype="float64", context=CONTEXT)
    full.runner.weights._cache["head.weight"] = part_vocab.runner.weights["head.weight"]
    full.runner._live = (None, None)                                  # every row multiplied
    assert part_vocab.runner.live_head is not None
    ids = rand_ids(30, seed=12)
    a, b = part_vocab.forward(ids), full.forward(ids)
    dead = np.setdiff1d(np.arange(a.shape[-1]), part_vocab.draft_vocab)
    assert np.all(a[:, dead] == 0) and np.all(b[:, dead] == 0)
    assert np.abs(a - b).max() < 1e-12 and np.abs(a).max() > 0.1


def test_drafting_over_a_draft_vocabulary_keeps_greedy_and_sampled_tokens(part_vocab, rand_ids):
    prompt = list(rand_ids(40, seed=9))
    want = plain(part_vocab, prompt, 16)
    got = part_vocab.generate(prompt, max_tokens=16, draft_tokens=2, stop_ids=[])
    assert got.tokens == want.tokens and got.drafted > 0
    params = SamplingParams(temperature=0.8, seed=4)
    a = part_vocab.generate(prompt, max_tokens=8, sampling=params, draft_tokens=2, stop_ids=[])
    assert a.drafted > 0 and all(0 <= t < part_vocab.config.vocab_size for t in a.tokens)
    assert speculative.default_draft_tokens(part_vocab) == 2

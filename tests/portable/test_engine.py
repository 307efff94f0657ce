"""The one generation engine: every front end drives it and agrees (Model.generate, generate_batch, a
caller-driven Engine, ChatSession), n > 1 is one prefill with forked states, penalties / logit bias /
top-k act as their formulas say, a constraint's mask and end are obeyed, and stop strings are cut once."""

import numpy as np
import pytest

import dsv4
from dsv4.cli.session import ChatSession
from dsv4.portable.engine import Engine, Finished, Job, PrefixCache, StopMatcher, TextStream
from dsv4.portable.generate import Result
from dsv4.portable.sampling import Sampler, SamplingParams, filtered_probs


@pytest.fixture(scope="module")
def model():
    return dsv4.load("tiny", context=256)


class Events:
    """One job's events, collected."""

    def __init__(self):
        self.tokens, self.finished = [], None

    def __call__(self, event):
        if isinstance(event, Finished):
            self.finished = event
        else:
            self.tokens.append(event.id)


def drive(engine):
    while engine.busy:
        engine.turn()


class Sequence:
    """A hand-written constraint: only `ids`, in order; finished after the last one."""

    def __init__(self, ids, vocab):
        self.ids, self.vocab, self.at = list(ids), vocab, 0

    def mask(self):
        allowed = np.zeros(self.vocab, dtype=bool)
        allowed[self.ids[self.at]] = True
        return allowed

    def accept(self, token_id):
        assert token_id == self.ids[self.at], "the sampler produced an id the mask forbids"
        self.at += 1

    @property
    def finished(self):
        return self.at == len(self.ids)

    def fork(self):
        copy = Sequence(self.ids, self.vocab)
        copy.at = self.at
        return copy


def test_every_front_end_produces_the_same_greedy_tokens(model, rand_ids):
    prompts = [[0] + list(rand_ids(n, seed=n)) for n in (5, 17, 40)]
    single = [model.generate(p, max_tokens=7, stop_ids=[]).tokens for p in prompts]
    batched = model.generate_batch(prompts, max_tokens=7, stop_ids=[], max_batch=3, prefill_chunk=8)
    assert [r.tokens for r in batched] == single
    assert all(r.finish_reason == "length" and r.completion_tokens == 7 for r in batched)
    streamed = [[t.id for t in model.stream(p, max_tokens=7, stop_ids=[], prefill_chunk=3)] for p in prompts]
    assert streamed == single


def test_chat_session_agrees_with_model_generate(model):
    session = ChatSession(model, max_tokens=10)
    ids = session.prompt_ids([{"role": "user", "content": "Hello there"}])
    res = session.turn("Hello there")
    tokens = model.generate(ids, max_tokens=10).tokens
    text = TextStream(model.tokenizer, (), "chat")
    for t in tokens:
        text.push(t)
    text.finish()
    assert res.completion_tokens == len(tokens)
    assert res.content == text.parser.message()["content"]


def test_n_choices_share_one_prefill_and_sample_their_own_streams(model, rand_ids):
    prompt = [0] + list(rand_ids(30, seed=4))
    sampling = SamplingParams(temperature=1.0, seed=7)
    sinks = [Events() for _ in range(4)]
    forks = [Job(prompt=prompt, max_tokens=6, emit=s, sampling=sampling, index=i)
             for i, s in enumerate(sinks[1:], 1)]
    lead = Job(prompt=prompt, max_tokens=6, emit=sinks[0], sampling=sampling, forks=forks)
    engine = Engine(model, max_batch=4, prefill_chunk=8)
    engine.submit(lead)
    drive(engine)
    assert engine.stats()["prefill_steps"] == 4              # 31 prompt tokens in chunks of 8, once
    assert all(s.finished.reason == "length" and len(s.tokens) == 6 for s in sinks)
    assert len({tuple(s.tokens) for s in sinks}) > 1           # each choice its own random stream
    assert sinks[0].tokens == model.generate(prompt, max_tokens=6, stop_ids=[], sampling=sampling).tokens


def test_forks_end_with_a_job_cancelled_before_its_prefill(model):
    sinks = [Events(), Events()]
    fork = Job(prompt=[0, 5, 6], max_tokens=3, emit=sinks[1], index=1)
    lead = Job(prompt=[0, 5, 6], max_tokens=3, emit=sinks[0], forks=[fork])
    engine = Engine(model)
    engine.submit(lead)
    engine.turn()                       # admitted; the prompt is read in one chunk, both sample once
    lead.cancel()
    fork.cancel()
    drive(engine)
    assert [s.finished.reason for s in sinks] == ["cancelled", "cancelled"]
    lonely = Job(prompt=[0, 5, 6], max_tokens=3, emit=sinks[0], forks=[Job([0, 5, 6], 3, sinks[1], index=1)])
    engine.submit(lonely)
    lonely.cancel()                     # before any turn: the fork is told too
    engine.turn()
    assert sinks[1].finished.reason == "cancelled" and not engine.busy


def test_a_constraint_masks_every_token_and_ends_the_job(model, rand_ids):
    vocab = model.config.vocab_size
    wanted = [11, 500, 7, 300]
    prompt = [0] + list(rand_ids(9, seed=2))
    res = model.generate(prompt, max_tokens=20, stop_ids=[], constraint=Sequence(wanted, vocab),
                         sampling=SamplingParams(temperature=1.0, seed=3))
    assert res.tokens == wanted and res.finish_reason == "stop"
    short = model.generate(prompt, max_tokens=2, stop_ids=[], constraint=Sequence(wanted, vocab))
    assert short.tokens == wanted[:2] and short.finish_reason == "length"
    sinks = [Events(), Events()]
    base = Sequence(wanted, vocab)
    fork = Job(prompt=prompt, max_tokens=20, emit=sinks[1], constraint=base.fork(), index=1)
    engine = Engine(model, max_batch=2)
    engine.submit(Job(prompt=prompt, max_tokens=20, emit=sinks[0], constraint=base, forks=[fork]))
    drive(engine)
    assert [s.tokens for s in sinks] == [wanted, wanted]


def test_a_constraint_that_allows_nothing_is_an_error(model):
    class Nothing(Sequence):
        def mask(self):
            return np.zeros(self.vocab, dtype=bool)

    with pytest.raises(ValueError, match="allows no next token"):
        model.generate([0, 5, 6], max_tokens=3, constraint=Nothing([1], model.config.vocab_size))


def test_presence_and_frequency_penalties_follow_the_openai_formula():
    logits = np.random.default_rng(1).standard_normal(50).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25))
    sampler.counts = {3: 2, 9: 1}
    want = logits.astype(np.float64).copy()
    want[3] -= 2 * 0.25 + 0.5
    want[9] -= 1 * 0.25 + 0.5
    got = sampler.adjusted(logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    probs = filtered_probs(got, sampler.params)
    ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    # exp(-Δ) of the unpenalized odds against any untouched id, exactly
    assert probs[3] / probs[0] == pytest.approx(ref[3] / ref[0] * np.exp(-1.0), rel=1e-5)
    assert probs[9] / probs[0] == pytest.approx(ref[9] / ref[0] * np.exp(-0.75), rel=1e-5)


def test_the_sampler_counts_what_it_generated():
    logits = np.zeros(10, dtype=np.float32)
    logits[4] = 1.0
    sampler = Sampler(SamplingParams(frequency_penalty=2.0))
    assert [sampler(logits) for _ in range(3)] == [4, 0, 1]    # greedy: 4 once, then penalized below 0
    assert sampler.counts == {4: 1, 0: 1, 1: 1}


def test_logit_bias_forces_and_bans_ids(model, rand_ids):
    logits = np.random.default_rng(2).standard_normal(100).astype(np.float32) * 3
    hot = Sampler(SamplingParams(temperature=1.0, seed=1, logit_bias=((42, 100.0),)))
    assert {hot(logits) for _ in range(50)} == {42}
    best = int(np.argmax(logits))
    banned = Sampler(SamplingParams(logit_bias=((best, -100.0),)))
    assert banned(logits) == int(np.argsort(-logits)[1])
    prompt = [0] + list(rand_ids(6, seed=9))
    res = model.generate(prompt, max_tokens=4, stop_ids=[], sampling=SamplingParams(logit_bias=((77, 100.0),)))
    assert res.tokens == [77] * 4


def test_top_k_one_is_greedy_and_each_choice_has_its_own_seeded_stream():
    logits = np.random.default_rng(3).standard_normal(200).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=5))
    assert {sampler(logits) for _ in range(20)} == {int(np.argmax(logits))}
    p = SamplingParams(temperature=1.0, seed=5)

    def draws(sampler):
        return [sampler(logits) for _ in range(20)]

    assert draws(Sampler(p, stream=1)) == draws(Sampler(p, stream=1))     # reproducible per choice
    assert draws(Sampler(p, stream=0)) == draws(Sampler(p))               # choice 0 is the n = 1 answer
    assert draws(Sampler(p, stream=0)) != draws(Sampler(p, stream=1))


def test_bad_penalties_and_biases_are_named():
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="frequency_penalty must be in"):
        SamplingParams(frequency_penalty=-3)
    with pytest.raises(ValueError, match="logit_bias must map"):
        SamplingParams(logit_bias=((5, 101.0),))


def test_prefix_cache_serves_an_identical_prompt_without_a_step(model, rand_ids):
    prompt = [0] + list(rand_ids(20, seed=6))
    cache = PrefixCache()
    first = model.generate(prompt, max_tokens=3, stop_ids=[], cache=cache)
    engine = Engine(model, cache=cache)
    sink = Events()
    engine.submit(Job(prompt=prompt, max_tokens=3, emit=sink))
    drive(engine)
    assert engine.stats()["prefill_steps"] == 0 and sink.tokens == first.tokens


def test_stop_strings_are_cut_once_across_token_boundaries(model):
    matcher = StopMatcher(["END"])
    assert matcher.feed("abcE") == ("abc", None)        # "E" may grow into the stop: held back
    assert matcher.feed("N") == ("", None)
    assert matcher.feed("Dxyz") == ("", "END")
    tok = model.tokenizer
    ids = tok.encode("hello world, the END is near")
    text = TextStream(tok, ["END"], "raw")
    out = []
    for i in ids:
        out += text.push(i)
        if text.stop is not None:
            break
    assert "".join(e.text for e in out) == "hello world, the " and text.stop == "END"
    assert text.push(ids[-1]) == [] and text.finish() == []


def test_leaving_a_stream_early_caches_its_state_and_fills_the_result(model, rand_ids):
    prompt = [0] + list(rand_ids(12, seed=8))
    cache, res = PrefixCache(), Result()
    tokens = model.stream(prompt, max_tokens=10, stop_ids=[], cache=cache, result=res)
    first = [next(tokens).id for _ in range(3)]
    tokens.close()
    assert res.tokens[:3] == first and len(res.tokens) <= 4 and res.finish_reason == "cancelled"
    hit = cache.lookup(prompt + res.tokens)
    assert hit is not None and hit[0] == prompt + res.tokens[:-1]      # the last id sampled was never fed


def test_should_stop_ends_a_prefill_between_chunks(model, rand_ids):
    prompt = [0] + list(rand_ids(40, seed=12))
    engine_turns = []
    res = Result()
    out = list(model.stream(prompt, max_tokens=5, prefill_chunk=8, result=res,
                            should_stop=lambda: engine_turns.append(1) or len(engine_turns) >= 2))
    assert out == [] and res.finish_reason == "cancelled" and res.completion_tokens == 0

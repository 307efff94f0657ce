"""The scheduler without HTTP: batched decode equals one-at-a-time decode, prefix reuse, queue bound,
context check and cancellation."""

import threading

import numpy as np
import pytest

import dsv4
from dsv4.portable.engine import Engine, Finished, Job, PrefixCache, QueueFull
from dsv4.portable.generate import generate


class Collector:
    """Thread-safe sink for one job's events."""

    def __init__(self, on_token=None):
        self.tokens, self.finished, self.done = [], None, threading.Event()
        self.on_token = on_token

    def __call__(self, event):
        if isinstance(event, Finished):
            self.finished = event
            self.done.set()
        else:
            self.tokens.append(event.id)
            if self.on_token:
                self.on_token(self)


@pytest.fixture(scope="module")
def tiny_model():
    return dsv4.load("tiny", context=256)


def _run(engine, prompts, max_tokens, on_token=None):
    sinks = [Collector(on_token) for _ in prompts]
    jobs = [Job(prompt=list(p), max_tokens=max_tokens, emit=s) for p, s in zip(prompts, sinks)]
    for job in jobs:
        engine.submit(job)
    for s in sinks:
        assert s.done.wait(120), "job did not finish"
    return jobs, sinks


def test_batched_decode_matches_single_sequence_generation(tiny_model):
    rng = np.random.default_rng()
    prompts = [[0] + rng.integers(10, 1000, size=n).tolist() for n in rng.integers(3, 20, size=3)]
    expected = [generate(tiny_model, p, max_tokens=6, stop_ids=[]).tokens for p in prompts]
    engine = Engine(tiny_model, max_batch=4, prefill_chunk=8).start()
    try:
        jobs, sinks = _run(engine, prompts, 6)
        stats = engine.stats()
    finally:
        engine.close()
    assert engine.batching
    assert [s.tokens for s in sinks] == expected
    assert all(s.finished.reason == "length" and s.finished.completion_tokens == 6 for s in sinks)
    assert stats["decode_rows"] > stats["decode_steps"], "decode steps were never batched"


def test_sequential_engine_and_prefix_cache(tiny_model):
    rng = np.random.default_rng()
    prompt = [0] + rng.integers(10, 1000, size=12).tolist()
    engine = Engine(tiny_model, max_batch=1, cache=PrefixCache()).start()
    try:
        (first,), (s1,) = _run(engine, [prompt], 4)
        (again,), (s2,) = _run(engine, [prompt], 4)
        longer = prompt + s1.tokens[:3] + rng.integers(10, 1000, size=2).tolist()
        (ext,), (s3,) = _run(engine, [longer], 3)
    finally:
        engine.close()
    assert not engine.batching
    assert first.cached_tokens == 0
    assert again.cached_tokens == len(prompt) and s2.tokens == s1.tokens
    assert ext.cached_tokens >= len(prompt) + 3
    assert s3.tokens == generate(tiny_model, longer, max_tokens=3, stop_ids=[]).tokens


def test_queue_bound_and_context_check(tiny_model):
    engine = Engine(tiny_model, max_queue=2)          # not started: jobs stay waiting
    jobs = [Job(prompt=[0, 5, 6], max_tokens=2, emit=lambda e: None) for _ in range(3)]
    engine.submit(jobs[0])
    engine.submit(jobs[1])
    with pytest.raises(QueueFull):
        engine.submit(jobs[2])
    jobs[0].cancel()                                   # a cancelled waiting job frees its slot
    engine.submit(jobs[2])
    assert engine.stats()["waiting"] == 2
    with pytest.raises(ValueError, match="context"):
        engine.submit(Job(prompt=[0] * 200, max_tokens=57, emit=lambda e: None))


def test_cancel_stops_a_running_job(tiny_model):
    holder = {}

    def cancel_after_two(sink):
        if len(sink.tokens) == 2:
            holder["job"].cancel()

    sink = Collector(cancel_after_two)
    holder["job"] = Job(prompt=[0] + np.random.default_rng().integers(10, 1000, size=4).tolist(),
                        max_tokens=100, emit=sink)
    engine = Engine(tiny_model).start()
    try:
        engine.submit(holder["job"])
        assert sink.done.wait(120)
    finally:
        engine.close()
    assert sink.finished.reason == "cancelled"
    assert 2 <= len(sink.tokens) <= 3 and engine.stats()["running"] == 0

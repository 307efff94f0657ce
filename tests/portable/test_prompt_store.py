"""The prompt cache on disk (`portable.prompt_store`): exact round trips of states, longest-prefix lookup,
LRU eviction under the bound, atomic writes, and files it must not use (corrupt, another model's)."""

import logging
import os
import time

import numpy as np
import pytest

import dsv4
from dsv4.portable.prompt_store import PromptStore, StateStore, model_fingerprint

FP = "ab" * 32


def arrays(seed: int, n: int = 1000) -> dict:
    rng = np.random.default_rng(seed)
    return {"start": np.array([seed], dtype=np.int64), "L0.window": rng.standard_normal((1, n)).astype(np.float32),
            "L0.entries.nope": rng.integers(0, 256, (1, 8, 4), dtype=np.uint8)}


def prefill(model, ids):
    state = model.new_state(1)
    logits, state = model.step(state, np.asarray([ids], dtype=np.int64))
    return state, logits[0, -1]


@pytest.fixture(scope="module")
def tiny_f32(tiny_dir):
    return dsv4.load(tiny_dir, context=512)


@pytest.fixture(scope="module")
def tiny_deploy(tiny_dir):
    return dsv4.load(tiny_dir, dtype="bfloat16", state_format="deploy", context=512)


# ------------------------------------------------------------------ the store on its own
def test_roundtrip_is_bit_exact_and_the_longest_prefix_wins(tmp_path):
    store = PromptStore(tmp_path, FP, 1 << 20)
    ids = list(range(3, 40))
    assert store.save(ids[:10], arrays(1)) and store.save(ids[:25], arrays(2), logits=np.arange(5.0))
    assert store.save([9, 9, 9], arrays(3))                        # not a prefix of ids
    again = PromptStore(tmp_path, FP, 1 << 20)                     # a new process: nothing in memory
    hit = again.longest(ids)
    assert hit.tokens == 25 and hit.info["tokens"] == "25"
    assert set(hit.arrays) == set(arrays(2))
    for k, v in arrays(2).items():
        assert hit.arrays[k].dtype == v.dtype and np.array_equal(hit.arrays[k], v)
    assert hit.logits.dtype == np.float32 and np.array_equal(hit.logits, np.arange(5.0))
    assert again.longest(ids[:24]).tokens == 10 and again.longest(ids[:24]).logits is None
    assert again.longest(ids, longer_than=25) is None and again.longest(ids[:9]) is None
    assert again.saved_lengths() == [25, 10, 3]


def test_lru_eviction_keeps_the_directory_under_its_bound(tmp_path):
    probe = PromptStore(tmp_path / "probe", FP, 1 << 30)
    probe.save([1], arrays(0))
    one = next((tmp_path / "probe").iterdir()).stat().st_size
    store = PromptStore(tmp_path / "c", FP, int(2.5 * one))
    a, b, c = [1, 2], [3, 4], [5, 6]
    store.save(a, arrays(1))
    store.save(b, arrays(2))
    now = time.time()
    os.utime(store.path_for(a), (now - 100, now - 100))
    os.utime(store.path_for(b), (now - 50, now - 50))
    assert store.longest(a + [7]).tokens == 2                     # a hit makes `a` the most recently used
    store.save(c, arrays(3))
    left = {p.name for p in (tmp_path / "c").iterdir()}
    assert left == {store.path_for(a).name, store.path_for(c).name}
    assert sum(p.stat().st_size for p in (tmp_path / "c").iterdir()) <= store.max_bytes
    assert not PromptStore(tmp_path / "d", FP, one // 2).save(a, arrays(1))   # larger than the bound: not saved
    assert list((tmp_path / "d").iterdir()) == []


def test_a_partial_temp_file_is_never_read_and_is_removed_once_stale(tmp_path, caplog):
    store = PromptStore(tmp_path, FP, 1 << 20)
    store.save([1, 2, 3], arrays(1))
    good = store.path_for([1, 2, 3]).read_bytes()
    tmp = tmp_path / ".tmp-999-1.safetensors"
    tmp.write_bytes(good[:len(good) // 2])                         # a writer died half-way
    with caplog.at_level(logging.WARNING, "dsv4.prompt_store"):
        assert store.longest([1, 2, 3, 4]).tokens == 3
        assert store.saved_lengths() == [3]
    assert caplog.records == [] and tmp.exists()
    os.utime(tmp, (time.time() - 7200,) * 2)
    store.save([5], arrays(2))
    assert not tmp.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong ids"])
def test_a_corrupt_file_is_a_miss_with_one_warning(tmp_path, caplog, damage):
    store = PromptStore(tmp_path, FP, 1 << 20)
    store.save([1, 2], arrays(1))
    store.save([1, 2, 3], arrays(2))
    path = store.path_for([1, 2, 3])
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-10])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        path.write_bytes(store.path_for([1, 2]).read_bytes())     # another prefix's file under this name
    with caplog.at_level(logging.WARNING, "dsv4.prompt_store"):
        hit = store.longest([1, 2, 3, 4])
        assert hit.tokens == 2                                     # the next shorter prefix still serves
        assert store.longest([1, 2, 3, 4]).tokens == 2
    assert len(caplog.records) == 1 and path.name in caplog.records[0].getMessage()
    assert not path.exists()                                       # deleted: it will not warn again


def test_another_fingerprint_never_loads(tmp_path, caplog):
    mine = PromptStore(tmp_path, FP, 1 << 20)
    mine.save([1, 2, 3], arrays(1))
    other = PromptStore(tmp_path, "cd" * 32, 1 << 20)
    assert other.longest([1, 2, 3, 4]) is None and other.saved_lengths() == []
    os.replace(mine.path_for([1, 2, 3]), other.path_for([1, 2, 3]))   # renamed to the other model's name
    with caplog.at_level(logging.WARNING, "dsv4.prompt_store"):
        assert other.longest([1, 2, 3, 4]) is None
    assert "another model" in caplog.text and not other.path_for([1, 2, 3]).exists()


def test_a_failed_write_is_a_warning_and_leaves_nothing(tmp_path, caplog, monkeypatch):
    from dsv4.portable import prompt_store

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prompt_store, "save_file", full_disk)
    store = PromptStore(tmp_path, FP, 1 << 20)
    with caplog.at_level(logging.WARNING, "dsv4.prompt_store"):
        assert not store.save([1, 2], arrays(1))
    assert "No space left on device" in caplog.text and list(tmp_path.iterdir()) == []


def test_bad_directory_and_bound_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot use .* it is not a directory"):
        PromptStore(tmp_path / "file", FP, 1 << 20)
    with pytest.raises(ValueError, match="> 0 bytes"):
        PromptStore(tmp_path, FP, 0)


# ------------------------------------------------------------------ states of real models
def test_fingerprint_names_the_checkpoint_and_the_numerics(tiny_dir, tiny2_dir, tiny_f32, tiny_deploy):
    same = dsv4.load(tiny_dir, context=256)                        # the context is not part of it
    assert model_fingerprint(same) == model_fingerprint(tiny_f32)
    others = {model_fingerprint(tiny_deploy), model_fingerprint(dsv4.load(tiny2_dir, context=256)),
              model_fingerprint(dsv4.load(tiny_dir, dtype="bfloat16", context=256))}
    assert model_fingerprint(tiny_f32) not in others and len(others) == 3


@pytest.mark.parametrize("which", ["tiny_f32", "tiny_deploy"])
def test_a_restored_state_continues_exactly_like_the_original(tmp_path, rand_ids, request, which):
    model = request.getfixturevalue(which)
    ids = [int(t) for t in rand_ids(150, seed=5)]                 # crosses the 128-token bucket and window
    state, logits = prefill(model, ids)
    assert StateStore(model, tmp_path, 1 << 30).save(ids, state, logits)

    n, restored, saved_logits = StateStore(model, tmp_path, 1 << 30).restore(ids + [7, 8])
    assert n == len(ids) and np.array_equal(saved_logits, logits)
    before, after = model.runner.state_to_numpy(state), model.runner.state_to_numpy(restored)
    assert before.keys() == after.keys()
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    assert restored.capacity == state.capacity

    a, b = model.fork_state(state), restored
    tok_a = tok_b = int(np.argmax(logits))
    for _ in range(6):                                             # greedy continuation from both
        la, a = model.step(a, np.asarray([[tok_a]]))
        lb, b = model.step(b, np.asarray([[tok_b]]))
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-6)
        tok_a, tok_b = int(np.argmax(la[0, -1])), int(np.argmax(lb[0, -1]))
        assert tok_a == tok_b


def test_a_state_restores_at_the_capacity_its_tokens_need(tmp_path, tiny_f32, rand_ids):
    ids = [int(t) for t in rand_ids(100, seed=2)]
    state, logits = prefill(tiny_f32, ids)
    state.resize(tiny_f32.runner.ops, 384)                         # grown further than 100 tokens need
    StateStore(tiny_f32, tmp_path, 1 << 30).save(ids, state, logits)
    _, restored, _ = StateStore(tiny_f32, tmp_path, 1 << 30).restore(ids)
    assert restored.capacity == 128
    la, _ = tiny_f32.step(tiny_f32.fork_state(state), np.asarray([[5]]))
    lb, _ = tiny_f32.step(restored, np.asarray([[5]]))
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-6)


def test_another_model_does_not_restore_and_a_misshapen_state_is_dropped(tmp_path, tiny_f32, tiny2_dir,
                                                                        rand_ids, caplog):
    ids = [int(t) for t in rand_ids(20, seed=3)]
    state, logits = prefill(tiny_f32, ids)
    StateStore(tiny_f32, tmp_path, 1 << 30).save(ids, state, logits)
    tiny2 = dsv4.load(tiny2_dir, context=256)
    other = StateStore(tiny2, tmp_path, 1 << 30)
    assert other.restore(ids) is None
    mine = StateStore(tiny_f32, tmp_path, 1 << 30)
    bad = dict(tiny_f32.runner.state_to_numpy(state))
    bad["L0.window"] = bad["L0.window"][:, :3]
    mine.files.save(ids[:10], bad, logits, info={"capacity": "128"})
    mine.files.save(ids[:5], tiny_f32.runner.state_to_numpy(state), info={"capacity": "128"})   # no logits
    with caplog.at_level(logging.WARNING, "dsv4.prompt_store"):
        assert mine.restore(ids[:12]) is None
    assert "L0.window" in caplog.text and "no next-token logits" in caplog.text
    assert not mine.files.path_for(ids[:10]).exists() and not mine.files.path_for(ids[:5]).exists()
    assert mine.restore(ids)[0] == 20


def test_generation_resumes_from_disk_after_a_restart(tmp_path, tiny_f32, rand_ids):
    """Two `PrefixCache`s on one directory stand for two processes: the second reads only the new tokens
    and generates exactly what the first did."""
    from dsv4.portable.generate import PrefixCache, generate

    ids = [int(t) for t in rand_ids(60, seed=9)]
    first = generate(tiny_f32, ids, max_tokens=5, cache=PrefixCache(disk=StateStore(tiny_f32, tmp_path, 1 << 30)))
    assert first.cached_tokens == 0
    again = generate(tiny_f32, ids, max_tokens=5, cache=PrefixCache(disk=StateStore(tiny_f32, tmp_path, 1 << 30)))
    assert again.cached_tokens == len(ids) and again.tokens == first.tokens
    longer = ids + first.tokens + [11, 12]
    resumed = generate(tiny_f32, longer, max_tokens=3, cache=PrefixCache(disk=StateStore(tiny_f32, tmp_path, 1 << 30)))
    assert resumed.cached_tokens == len(ids) + len(first.tokens) - 1     # the first run's end (last token unfed)
    assert resumed.tokens == generate(tiny_f32, longer, max_tokens=3).tokens

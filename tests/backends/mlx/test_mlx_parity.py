"""The correctness ladder on MLX (float32) against the float64 reference, both tiny configs:
whole forward at every position, state consistency, MTP, batch, and greedy decoding."""

import numpy as np
import pytest

import dsv4
from dsv4.portable.config import preset

CONTEXT = 512
CONFIGS = ["tiny", "tiny2"]


@pytest.fixture(scope="module")
def one_shot(mlx32, session_ids):
    out = {}

    def get(name):
        if name not in out:
            out[name] = mlx32(name).forward(session_ids[name])
        return out[name]
    return get


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_float64_reference_at_every_position(name, one_shot, ref64, rel_err):
    err = rel_err(one_shot(name), ref64(name))
    assert err.shape == (300,)
    assert err.max() <= 1e-4, f"worst position {err.argmax()}: {err.max():.2e}"


@pytest.mark.parametrize("name", CONFIGS)
def test_state_ladder_prefill_decode_and_uneven_chunks(name, mlx32, one_shot, session_ids, rel_err):
    """one-shot 300 == prefill 201 + 99 single-token decodes == chunks 37+64+100+99 (spec §11 lengths)."""
    m, ids = mlx32(name), session_ids[name]
    full = one_shot(name)

    state = m.new_state(1)
    logits, state = m.step(state, ids[None, :201])
    outs = [logits[0]]
    for i in range(201, 300):
        logits, state = m.step(state, ids[None, i:i + 1])
        outs.append(logits[0])
    decoded = np.concatenate(outs)
    assert m.runner.position(state) == 300

    state = m.new_state(1)
    outs, a = [], 0
    for n in (37, 64, 100, 99):
        logits, state = m.step(state, ids[None, a:a + n])
        outs.append(logits[0])
        a += n
    chunked = np.concatenate(outs)

    assert rel_err(decoded, full).max() <= 1e-5
    assert rel_err(chunked, full).max() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_mtp_block_matches_reference(name, ckpt, mlx32, rel_err):
    rng = np.random.default_rng(41)
    vocab = preset(name).vocab_size
    ids, nxt = rng.integers(3, vocab, 70), rng.integers(3, vocab, 70)
    ref = dsv4.load(ckpt(name), backend="reference", dtype="float64", context=CONTEXT).mtp_forward(ids, nxt)
    out = mlx32(name).mtp_forward(ids, nxt)
    assert rel_err(out, ref).max() <= 1e-4


def test_batch_rows_are_independent(mlx32, rel_err):
    """Two different sequences in one batch give the logits each gives alone."""
    m = mlx32("tiny")
    ids = np.random.default_rng(8).integers(3, 1024, (2, 70))
    both = m.forward(ids, chunk=32)
    for b in range(2):
        assert rel_err(both[b], m.forward(ids[b])).max() <= 1e-5


def test_greedy_64_tokens_identical_to_reference(ckpt, mlx32):
    prompt = np.random.default_rng(9).integers(3, 1024, 24)
    ref = dsv4.load(ckpt("tiny"), backend="reference", dtype="float32", context=CONTEXT)

    def greedy(model):
        state = model.new_state(1)
        logits, state = model.step(state, prompt[None])
        toks = []
        for _ in range(64):
            toks.append(int(np.argmax(logits[0, -1])))
            logits, state = model.step(state, np.array([[toks[-1]]]))
        return toks

    assert greedy(mlx32("tiny")) == greedy(ref)

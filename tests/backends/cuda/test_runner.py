"""The runner's state handling: bf16 storage of the "act" buffers, states as immutable values (eager path
and the CUDA-graph hand-off rules, the latter through `_StaticState` with a stand-in for the replay), the
eager fallback without a GPU, and — on a machine with a GPU only — graph decode against eager decode."""

import numpy as np
import pytest
import torch

import dsv4
from dsv4.backends.cuda.runner import _StaticState, clone_state
from dsv4.portable import cache

CTX = 256


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _upcast(state: dict) -> dict:
    return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}


def test_bf16_state_is_stored_in_bf16_losslessly(tiny_dir, rand_ids):
    """bfloat16 mode: window/entries/indexer keys are torch.bfloat16 (half the bytes), compressor rows stay
    float32, and feeding the same state upcast to float32 (the old storage) gives bit-identical logits and
    states — so nothing is lost by the narrower storage."""
    m = dsv4.load(tiny_dir, backend="cuda", dtype="bfloat16", context=CTX)
    specs = {b.name: b.kind for b in cache.state_spec(m.config, 1, CTX)}
    st = m.new_state()
    want = {"act": torch.bfloat16, "hp": torch.float32, "int": torch.int64}
    assert {k: v.dtype for k, v in st.items()} == {k: want[kind] for k, kind in specs.items()}
    assert any(k.endswith(".ikeys") for k in st) and any(k.endswith(".comp") for k in st)

    ids = rand_ids(156, seed=int(np.random.default_rng().integers(1 << 30)))
    logits, st = m.step(st, ids[None, :150])              # crosses the window and a ratio-128 block
    for i in range(150, 156):
        wide = _upcast(st)
        logits, st = m.step(st, ids[None, i:i + 1])
        logits_w, st_w = m.step(wide, ids[None, i:i + 1])
        assert np.array_equal(logits, logits_w)
        assert all(torch.equal(st[k].float() if st[k].is_floating_point() else st[k], st_w[k]) for k in st)
        assert {k: v.dtype for k, v in st.items()} == {k: want[kind] for k, kind in specs.items()}
    assert any(v.abs().max() > 0 for k, v in st.items() if k.endswith(".ikeys"))
    np_state = m.runner.state_to_numpy(st)
    assert all(np_state[k].dtype == (np.int64 if k == "start" else np.float32) for k in np_state)


def test_eager_fallback_and_states_are_values(tiny_dir, rand_ids):
    """Without a GPU every step is eager (no graph is captured) and no step changes a state it was given:
    resuming from an older state reproduces the same logits."""
    m = dsv4.load(tiny_dir, backend="cuda", dtype="float32", context=CTX)
    assert m.runner.cuda_graphs is torch.cuda.is_available()
    ids = rand_ids(40, seed=int(np.random.default_rng().integers(1 << 30)))
    _, a = m.step(m.new_state(), ids[None, :38])
    a_copy = clone_state(a)
    l1, b = m.step(a, ids[None, 38:39])
    l2, _ = m.step(b, ids[None, 39:40])
    assert _same(a, a_copy)
    assert np.array_equal(m.step(b, ids[None, 39:40])[0], l2)
    assert np.array_equal(m.step(a, ids[None, 38:39])[0], l1)
    if not torch.cuda.is_available():
        assert m.runner._graphs == {}


def test_clone_state_is_independent():
    st = {"start": torch.tensor([7, 9]), "w": torch.randn(2, 3, 4).to(torch.bfloat16), "h": torch.randn(2, 5)}
    c = clone_state(st)
    assert _same(c, st)
    for k in c:
        c[k] += 1
    assert not any(torch.equal(c[k], st[k]) for k in st)


def test_static_state_hand_off():
    """The decode graph's buffer rules, with an in-place update standing in for `graph.replay()`: returned
    states are snapshots that later replays never touch, the last one is resumed without a copy, any other
    state (older, or foreign) is copied in, dtypes are kept."""
    s0 = {"start": torch.tensor([3]), "win": torch.randn(1, 4, 8).to(torch.bfloat16), "ckv": torch.randn(1, 3, 8)}
    ss = _StaticState(s0)
    assert _same(ss.buf, s0) and all(ss.buf[k].data_ptr() != s0[k].data_ptr() for k in s0)

    def replay():                     # what the captured graph does to its buffers: update them in place
        ss.buf["start"] += 1
        ss.buf["win"].copy_(torch.roll(ss.buf["win"], 1, 1) * 2)
        ss.buf["ckv"].mul_(-0.5)

    def advanced(st, n):
        out = clone_state(st)
        for _ in range(n):
            out["start"] += 1
            out["win"] = torch.roll(out["win"], 1, 1) * 2
            out["ckv"] = out["ckv"] * -0.5
        return out

    s0_copy = clone_state(s0)
    ss.load(s0)
    replay()
    h1 = ss.hand_out()
    assert _same(h1, advanced(s0, 1)) and all(h1[k].data_ptr() != ss.buf[k].data_ptr() for k in h1)
    h1["ckv"][0, 0, 0] = 1e9          # (never done by callers) proves that resuming h1 copies nothing in
    ss.load(h1)
    assert ss.buf["ckv"][0, 0, 0] != 1e9
    h1["ckv"][0, 0, 0] = advanced(s0, 1)["ckv"][0, 0, 0]
    replay()
    h2 = ss.hand_out()
    assert _same(h1, advanced(s0, 1)) and _same(h2, advanced(s0, 2))
    ss.load(h1)                       # an older state: copied back in
    assert _same(ss.buf, h1)
    replay()
    assert _same(ss.hand_out(), h2)
    ss.load(s0)                       # a foreign state
    assert _same(ss.buf, s0) and _same(s0, s0_copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_decode_matches_eager(tiny_dir, rand_ids):
    ids = rand_ids(24, seed=int(np.random.default_rng().integers(1 << 30)))
    for dtype in ("float32", "bfloat16"):
        g = dsv4.load(tiny_dir, backend="cuda", dtype=dtype, context=CTX)
        e = dsv4.load(tiny_dir, backend="cuda", dtype=dtype, context=CTX, cuda_graphs=False)
        _, sg = g.step(g.new_state(), ids[None, :20])
        _, se = e.step(e.new_state(), ids[None, :20])
        first, steps = sg, []
        for i in range(20, 24):
            lg, sg = g.step(sg, ids[None, i:i + 1])
            steps.append(lg)
            le, se = e.step(se, ids[None, i:i + 1])
            np.testing.assert_allclose(lg, le, rtol=0, atol=1e-5 * np.abs(le).max())
            assert {k: v.dtype for k, v in sg.items()} == {k: v.dtype for k, v in se.items()}
        assert g.runner._graphs
        again, _ = g.step(first, ids[None, 20:21])       # resuming an old state after graph steps
        np.testing.assert_array_equal(again, steps[0])


def test_load_copies_every_tensor_up_front_and_reports_it(tiny_dir):
    """The torch weights are made at load (not on first use), with `progress` rising to the tensor bytes."""
    from dsv4.portable.checkpoint import Checkpoint
    total = Checkpoint(tiny_dir).nbytes()
    calls = []
    m = dsv4.load(tiny_dir, backend="cuda", context=CTX, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total and {t for _, t in calls} == {total}
    cached = m.runner.weights._cache
    assert "embed.weight" in cached and any(k.endswith(".experts.") for k in cached)

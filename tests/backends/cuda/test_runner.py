"""The runner's state handling: storage dtypes per buffer kind (bf16 "act" buffers losslessly), in-place
decode steps that write only their new rows into the same tensors, fork semantics, the new primitives
(codecs bit-exact with `portable.quant`, the partial top-k's tie rule, trim), the decode-graph cache rules
(with a stand-in for capture and replay), and — on a machine with a GPU only — graph decode against eager
decode."""

import numpy as np
import pytest
import torch

import dsv4
from dsv4.backends.cuda import runner as runner_mod
from dsv4.backends.cuda.ops import TorchOps
from dsv4.portable import cache, graph, quant
from dsv4.portable.reference import NumpyOps

CTX = 256
KIND_DTYPE = {"act": torch.bfloat16, "hp": torch.float32, "int": torch.int64, "u8": torch.uint8}


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def _dtypes(state) -> dict:
    return {k: v.dtype for k, v in state.items()}


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_bfloat16_state_storage_is_lossless(tiny_dir, rand_ids, fmt):
    """bfloat16 mode: "act" buffers (window, bf16 entries / indexer keys, deploy rope dims) are
    torch.bfloat16, compressor rows float32, codes and scales uint8; feeding a copy of the state widened to
    float32 gives bit-identical logits and buffers, so nothing is lost by the narrower storage."""
    m = dsv4.load(tiny_dir, backend="cuda", dtype="bfloat16", context=CTX, state_format=fmt)
    st = m.new_state()
    want = {b.name: KIND_DTYPE[b.kind] for b in st.specs}
    assert _dtypes(st) == want
    assert any(v == torch.uint8 for v in want.values()) == (fmt == "deploy")

    ids = rand_ids(156, seed=_seed())
    m.step(st, ids[None, :150])                           # crosses the window and a ratio-128 block
    for i in range(150, 156):
        wide = cache.State(st.cfg, {k: v.float() if v.dtype == torch.bfloat16 else v.clone()
                                    for k, v in st.items()}, st.capacity, st.fmt)
        logits, _ = m.step(st, ids[None, i:i + 1])
        logits_w, _ = m.step(wide, ids[None, i:i + 1])
        assert np.array_equal(logits, logits_w)
        assert all(torch.equal(st[k].float() if st[k].is_floating_point() else st[k], wide[k]) for k in st.keys())
        assert _dtypes(st) == want
    keys = "L1.index.keys" if fmt == "bf16" else "L1.index.keys.fp4"
    assert st[keys].float().abs().max() > 0
    np_state = m.runner.state_to_numpy(st)
    assert {k: v.dtype for k, v in np_state.items()} == {
        k: {torch.int64: np.int64, torch.uint8: np.uint8}.get(dt, np.float32) for k, dt in want.items()}


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> list:
    """Row indices (axis 1) where a and b differ."""
    diff = (a != b).reshape(a.shape[0], a.shape[1], -1).any(-1).any(0)
    return torch.nonzero(diff).flatten().tolist()


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_decode_step_writes_only_its_new_rows(tiny_dir, rand_ids, fmt):
    """A decode step changes, in the very same tensors: the window ring's row t % W, each pending ring's row
    t % R, an entry row only when a block completes at t (row t // m), else at most the spill row; nothing
    else.  Steps 60..67 cover ratio-4 completions and the spill row."""
    m = dsv4.load(tiny_dir, backend="cuda", dtype="float32", context=CTX, state_format=fmt)
    cfg = m.config
    ids = rand_ids(68, seed=_seed())
    st = m.new_state()
    m.step(st, ids[None, :60])
    entry_writes = 0
    for t in range(60, 68):
        objs = {k: v for k, v in st.items() if k != "start"}         # `start` is a value the forward re-binds
        before = {k: v.clone() for k, v in st.items()}
        m.step(st, ids[None, t:t + 1])
        assert all(st.buffers[k] is v for k, v in objs.items()), "a step must update the state's own tensors"
        assert int(st["start"][0]) == t + 1
        for name, spec in ((b.name, b) for b in st.specs if b.name != "start"):
            rows = _changed_rows(before[name], st[name])
            layer = cfg.num_hidden_layers if name.startswith("mtp") else int(name.split(".")[0][1:])
            field = name.split(".", 1)[1]
            spill = spec.shape[1] - 1
            if field == "window":
                assert rows == [t % cfg.sliding_window], name
            elif field in ("kv", "gate", "index.kv", "index.gate"):
                assert rows == [t % cfg.pending_rows(layer)], name
            else:                                          # entries / index keys (and their parts)
                ratio = cfg.ratio(layer)
                done = (t + 1) % ratio == 0
                assert set(rows) <= ({(t + 1) // ratio - 1} if done else set()) | {spill}, name
                entry_writes += bool(done and rows and rows[0] != spill)
    assert entry_writes > 0


def test_fork_diverges_independently(tiny_dir, rand_ids):
    """A fork is an independent copy: the parent and the fork, fed different tokens, each give exactly the
    logits of a fresh run of their own text, and share no storage."""
    m = dsv4.load(tiny_dir, backend="cuda", dtype="float32", context=CTX, state_format="deploy")
    ids = rand_ids(42, seed=_seed())
    alt = (ids[38:] + 7) % 1000 + 3
    parent = m.new_state()
    m.step(parent, ids[None, :38])
    child = m.fork_state(parent)
    assert all(child[k].data_ptr() != parent[k].data_ptr() for k in parent.keys())
    got_p = [m.step(parent, ids[None, i:i + 1])[0] for i in range(38, 42)]
    got_c = [m.step(child, alt[None, i - 38:i - 37])[0] for i in range(38, 42)]
    for text, got in ((ids, got_p), (np.concatenate([ids[:38], alt]), got_c)):
        fresh = m.new_state()                  # the same steps from scratch (deploy rounding makes a
        m.step(fresh, text[None, :38])         # one-shot forward differ at FP8 rounding boundaries)
        want = np.concatenate([m.step(fresh, text[None, i:i + 1])[0] for i in range(38, 42)], 1)[0]
        np.testing.assert_allclose(np.concatenate(got, 1)[0], want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert not np.allclose(got_p[-1], got_c[-1])
    if not torch.cuda.is_available():
        assert m.runner._graphs == {}


# ---------------------------------------------------------------------- primitives
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_codecs_are_bit_exact_with_quant(dtype):
    """FP8 (e4m3 + E8M0 per 64) and FP4 (packed e2m1 + E8M0 per 32) codes and scales equal the NumPy codecs'
    bytes, and decode to their values, across 40 binades, zero and tiny blocks (the scale floor), −0, and
    values on e2m1 rounding ties."""
    op = TorchOps("float64" if dtype == torch.float64 else "float32", device="cpu", kernels=False)
    rng = np.random.default_rng(_seed())
    x = rng.standard_normal((3, 7, 256)) * np.exp2(rng.integers(-30, 10, (3, 7, 1)))
    x[0, 0, :64] = 0.0
    x[0, 1, :64] = 1e-12
    x[0, 2, 5] = -0.0
    x[1, 0, :64] = np.linspace(-448 * 1.5, 448 * 1.5, 64)
    x[1, 1, :32] = np.arange(32) * 0.25 - 4                  # e2m1 ties (x.25, x.75 between grid points)
    x = x.astype(np.float64 if dtype == torch.float64 else np.float32)
    t = torch.as_tensor(x)
    for enc, dec, q_enc, q_dec, block in ((op.encode_fp8, op.decode_fp8, quant.encode_fp8_blocks,
                                           quant.decode_fp8_blocks, 64),
                                          (op.encode_fp4, op.decode_fp4, quant.encode_fp4_blocks,
                                           quant.decode_fp4_blocks, 32)):
        codes, scales = enc(t, block)
        want_codes, want_scales = q_enc(x, block)
        assert codes.dtype == scales.dtype == torch.uint8
        assert np.array_equal(codes.numpy(), want_codes) and np.array_equal(scales.numpy(), want_scales)
        assert len(np.unique(want_codes)) > 12
        back = dec(codes, scales, block)
        assert back.dtype == dtype and np.array_equal(back.numpy(), q_dec(want_codes, want_scales, block))


@pytest.mark.parametrize("n,k", [(50, 7), (64, 64), (5, 9), (300, 64), (33, 1)])
def test_topk_tie_rule_on_ties(n, k):
    """Values from 4 levels (ties everywhere) plus −inf rows and rows with fewer finite values than k: the
    same indices and order as a stable descending sort (ties → lower index), and as the reference."""
    rng = np.random.default_rng(_seed())
    x = rng.integers(0, 4, (3, 5, n)).astype(np.float32)
    x[0, 0] = -np.inf
    x[1, 1, : n // 2 + 1] = -np.inf
    x[2, 2] = 1.0
    op = TorchOps("float32", device="cpu", kernels=False)
    got = op.topk(torch.as_tensor(x), k).numpy()
    assert np.array_equal(got, np.argsort(-x, -1, kind="stable")[..., :k])
    assert np.array_equal(got, NumpyOps("float32").topk(x, k))


def test_trim_follows_counts_eagerly_and_keeps_shapes_for_graphs():
    op = TorchOps("float32", device="cpu", kernels=False)
    buf = torch.randn(2, 9, 3)
    assert op.trim(buf, torch.tensor([[3, 5], [1, 2]])).shape == (2, 5, 3)
    assert op.trim(buf, torch.zeros(2, 2, dtype=torch.int64)).shape == (2, 0, 3)
    with op.static_shapes():
        assert op.trim(buf, torch.tensor([[3]])) is buf
    assert op.hadamard(16) is op.hadamard(16)
    h = op.hadamard(16)
    assert torch.allclose(h @ h.T, torch.eye(16), atol=1e-6)


# ---------------------------------------------------------------------- decode-graph cache (stand-in)
class _FakeGraph(runner_mod._DecodeGraph):
    """Binds a state like a captured graph; `run` advances it eagerly, with the captured graph's final step
    (`keep_buffers`), as the stand-in for a replay."""

    made: list = []

    def __init__(self, runner, state, warmup=2):
        import weakref
        self.runner, self.state, self.buffers = runner, weakref.ref(state), dict(state.buffers)
        _FakeGraph.made.append(self)

    def run(self, ids):
        st = self.state()
        o = self.runner.ops
        out = graph.forward(o, self.runner.weights, self.runner.cfg, st, o.asarray(ids, "int"))
        self.keep_buffers(st)
        return out


def test_decode_graph_cache_rules(tiny_dir, rand_ids, monkeypatch):
    """One capture per state and capacity bucket, reused for every step of it (the state keeps the captured
    tensors, `start` included); a fork or a resized state gets its own capture, graphs of resized or
    dropped states are released, the cache stays bounded."""
    m = dsv4.load(tiny_dir, backend="cuda", dtype="float32", context=CTX)
    r = m.runner
    monkeypatch.setattr(runner_mod, "_DecodeGraph", _FakeGraph)
    monkeypatch.setattr(r, "cuda_graphs", True)
    monkeypatch.setattr(r, "max_graphs", 2)
    _FakeGraph.made = []
    ids = rand_ids(140, seed=_seed())
    a = m.new_state()
    m.step(a, ids[None, :120])
    for i in range(120, 128):
        m.step(a, ids[None, i:i + 1])
    assert len(_FakeGraph.made) == 1 and a.capacity == 128
    assert all(a.buffers[k] is t for k, t in _FakeGraph.made[0].buffers.items()) and int(a["start"][0]) == 128
    m.step(a, ids[None, 128:129])                         # grows into the 256 bucket: new buffers, new capture
    assert a.capacity == 256 and len(_FakeGraph.made) == 2 and list(r._graphs.values()) == [_FakeGraph.made[1]]
    b = m.fork_state(a)
    m.step(b, ids[None, 129:130])
    m.step(a, ids[None, 129:130])
    assert len(_FakeGraph.made) == 3 and len(r._graphs) == 2
    c = m.fork_state(a)
    m.step(c, ids[None, 130:131])                         # a third state: the least recently used goes
    assert len(r._graphs) == 2 and all(g.state() is not b for g in r._graphs.values())
    del c
    m.step(a, ids[None, 130:131])
    assert [g.state() for g in r._graphs.values()] == [a]
    got, _ = m.step(m.fork_state(a), ids[None, 131:132])   # the stand-in really stepped every state
    want = m.forward(ids[:132])[-1]
    np.testing.assert_allclose(got[0, -1], want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_graph_decode_matches_eager(tiny_dir, rand_ids, fmt):
    """Graph replay on the state's own buffers == eager steps, across a capacity bucket boundary (a new
    capture) and for a fork stepped beside its parent."""
    ids = rand_ids(140, seed=_seed())
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):     # bf16: a last-bit difference is a bf16 ulp
        g = dsv4.load(tiny_dir, backend="cuda", dtype=dtype, context=CTX, state_format=fmt)
        e = dsv4.load(tiny_dir, backend="cuda", dtype=dtype, context=CTX, state_format=fmt, cuda_graphs=False)
        sg, se = g.new_state(), e.new_state()
        g.step(sg, ids[None, :120])
        e.step(se, ids[None, :120])
        objs = dict(sg.buffers)
        for i in range(120, 134):
            lg, _ = g.step(sg, ids[None, i:i + 1])
            le, _ = e.step(se, ids[None, i:i + 1])
            np.testing.assert_allclose(lg, le, rtol=0, atol=tol * np.abs(le).max())
            if sg.capacity == 128:
                assert all(sg.buffers[k] is v for k, v in objs.items())
        assert sg.capacity == 256 and _dtypes(sg) == _dtypes(se)
        assert len(g.runner._graphs) == 1
        fg, fe = g.fork_state(sg), e.fork_state(se)
        for i in range(134, 140):
            for model, st, tok in ((g, sg, ids[i]), (e, se, ids[i]), (g, fg, ids[i] ^ 1), (e, fe, ids[i] ^ 1)):
                model.step(st, np.asarray([[tok]]))
        for a, b in ((sg, se), (fg, fe)):
            la, _ = g.step(a, ids[None, 139:140])
            lb, _ = e.step(b, ids[None, 139:140])
            np.testing.assert_allclose(la, lb, rtol=0, atol=tol * np.abs(lb).max())


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

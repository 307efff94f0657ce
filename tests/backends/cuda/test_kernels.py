"""Each Triton kernel vs its op-path decomposition (the `portable.ops` default on torch), run under the
Triton interpreter on the CPU: fresh random inputs, outputs poisoned with NaN / sentinel ints before the
kernel runs, awkward sizes (not multiples of the blocks), every segment form (masked ring, gathered
entries, rows per query, an empty one), all −1 index lists, a single visible entry, ties within and across
key segments."""

import zlib

import numpy as np
import pytest
import torch

from dsv4.backends.cuda.ops import TorchOps, kernels_available
from dsv4.portable import quant
from dsv4.portable.ops import Segment

pytestmark = pytest.mark.skipif(not kernels_available(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="needs triton (with TRITON_INTERPRET=1 on the CPU)")


@pytest.fixture
def K(monkeypatch):
    from dsv4.backends.cuda import kernels

    def poisoned(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
        return torch.full(tuple(shape), 123456789, dtype=dtype, device=device)
    monkeypatch.setattr(kernels, "_alloc", poisoned)
    return kernels


@pytest.fixture
def op():
    return TorchOps("float32", device="cpu", kernels=False)


@pytest.fixture
def gen(request):
    """A fresh seed per test (from the test's name), so inputs differ between tests but reproduce."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _close(a, b, tol=2e-5):
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= tol * max(1.0, b.abs().max())


def _segments(gen, b, s, d, n_win, n_ent, k_ent, k_pq):
    """The segment forms a layer attends: a masked ring, gathered entries (−1 = skip), rows gathered per
    query with a validity mask, and an empty segment (a trimmed prefix with nothing held yet)."""
    win = Segment.dense(torch.randn(b, n_win, d, generator=gen), torch.rand(b, s, n_win, generator=gen) < 0.6)
    ent = Segment.gather(torch.randn(b, n_ent, d, generator=gen), torch.randint(-1, n_ent, (b, s, k_ent), generator=gen))
    pq = Segment.per_query(torch.randn(b, s, k_pq, d, generator=gen), torch.rand(b, s, k_pq, generator=gen) < 0.5)
    empty = Segment.dense(torch.zeros(b, 0, d), torch.zeros(b, s, 0, dtype=torch.bool))
    return [win, ent, empty, pq]


@pytest.mark.parametrize("s", [1, 5], ids=["decode", "prefill"])
def test_sink_attention(K, op, gen, s):
    b, h, d = 2, 5, 96
    segs = _segments(gen, b, s, d, n_win=13, n_ent=45, k_ent=37, k_pq=7)
    win, ent, _, pq = segs
    win.mask[0, 0] = False                          # nothing visible: output is exactly 0 (sink only)
    ent.idx[0, 0] = -1
    pq.mask[0, 0] = False
    win.mask[1, 0] = False                          # a single visible entry
    ent.idx[1, 0] = -1
    ent.idx[1, 0, 17] = 3
    pq.mask[1, 0] = False
    ent.idx[:, -1, 20:] = -1
    q = torch.randn(b, s, h, d, generator=gen)
    sink = torch.randn(h, generator=gen)
    got = K.sink_attention(q, segs, sink, d ** -0.5)
    _close(got, op.sink_attention(q, segs, sink, d ** -0.5))
    assert torch.equal(got[0, 0], torch.zeros(h, d))
    kv3 = ent.kv[1, 3]
    p1 = 1 / (1 + torch.exp(sink - (q[1, 0] @ kv3) * d ** -0.5))         # single entry: weight vs the sink
    _close(got[1, 0], p1[:, None] * kv3[None])


def test_sink_attention_single_query_leaves_inputs_alone(K, op, gen):
    """B = S = 1 (one decode token): the running state must be a fresh buffer, never a view of the sink."""
    h, d = 4, 64
    segs = _segments(gen, 1, 1, d, n_win=40, n_ent=20, k_ent=9, k_pq=3)
    q, sink = torch.randn(1, 1, h, d, generator=gen), torch.randn(h, generator=gen)
    before = [t.clone() for t in (q, sink)]
    got = K.sink_attention(q, segs, sink, 0.1)
    assert all(torch.equal(a, b) for a, b in zip((q, sink), before))
    _close(got, op.sink_attention(q, segs, sink, 0.1))


def test_sink_attention_bf16_segments(K, op, gen):
    """bf16-stored rows (the window ring and bf16-format entries of a bfloat16 run) are read as float32."""
    b, s, h, d = 1, 3, 4, 64
    segs = _segments(gen, b, s, d, n_win=9, n_ent=20, k_ent=11, k_pq=5)
    for seg in segs:
        seg.kv = seg.kv.to(torch.bfloat16)
    q = torch.randn(b, s, h, d, generator=gen)
    sink = torch.randn(h, generator=gen)
    _close(K.sink_attention(q, segs, sink, 0.1), op.sink_attention(q, segs, sink, 0.1))


def _indexer_inputs(gen, b, s, nh, c, n, palette=None, integers=False):
    """Random q, weights and keys; `palette`: keys drawn from a few vectors (ties everywhere); `integers`:
    small integer values, so every score is exact in any summation order and ties between segments (whose
    scores the op path computes in separate matmuls) are exact too."""
    draw = (lambda *shape: torch.randint(-3, 4, shape, generator=gen).float()) if integers else \
        (lambda *shape: torch.randn(*shape, generator=gen))
    qi, w = draw(b, s, nh, c), draw(b, s, nh)
    if palette is None:
        keys = draw(b, n, c)
    else:
        keys = draw(palette, c)[torch.randint(0, palette, (b, n), generator=gen)]
    return qi, w, keys


@pytest.mark.parametrize("nh,c,n,k,palette", [(6, 40, 53, 8, None), (3, 16, 70, 12, None), (5, 24, 45, 7, 3)],
                         ids=["k8", "k12", "ties"])
def test_indexer_topk_fused(K, op, gen, nh, c, n, k, palette):
    """The fused kernel returns exactly the op path's indices, in its order (score descending, lower index
    first on ties), with −1 padding: N not a multiple of the merge block (BK = next pow2 ≥ k, ≥ 16), nothing
    visible, one visible, fewer visible than k, all visible, causal (prefill) visibility, ties."""
    b, s = 2, 4
    qi, w, keys = _indexer_inputs(gen, b, s, nh, c, n, palette)
    if palette is None:
        keys[:, 14:19] = keys[:, 30:31]             # exact ties straddling the first block boundary (16)
        keys[:, 40:44] = 0.0                        # exact zero scores (±0 ties)
    visible = torch.tensor([[0, 1, k - 2, n], [17, n - 7, n, 33]])
    (got,) = K.indexer_topk(qi, w, [(keys, visible)], k)
    (want,) = op.indexer_topk(qi, w, [(keys, visible)], k)
    assert torch.equal(got, want)
    assert (got[0, 0] == -1).all()
    assert torch.equal(got[0, 1], torch.tensor([0] + [-1] * (k - 1)))
    assert (got[0, 2, :k - 2] >= 0).all() and (got[0, 2, k - 2:] == -1).all()
    assert (got[got >= 0] < visible[..., None].expand_as(got)[got >= 0]).all()


@pytest.mark.parametrize("palette", [None, 3], ids=["integers", "palette"])
def test_indexer_topk_segments(K, op, gen, palette):
    """Stored keys plus the chunk's new keys as two segments: the same picks as the op path over the
    concatenation, split per segment; ties across segments go to the stored (earlier) rows; an empty
    segment contributes nothing; k larger than all rows is clipped like the op path."""
    b, s, nh, c, k = 2, 3, 4, 24, 9
    qi, w, keys = _indexer_inputs(gen, b, s, nh, c, 41 + 5, palette, integers=True)
    old, new = keys[:, :41], keys[:, 41:].clone()
    new[:, 2] = old[:, 7]                           # an exact tie between the segments
    n_old = torch.tensor([[41, 30, 0], [5, 41, 12]])
    n_new = torch.tensor([[1, 5, 3], [0, 2, 5]])
    segs = [(old, n_old), (keys[:, :0], torch.zeros_like(n_old)), (new, n_new)]
    got, want = K.indexer_topk(qi, w, segs, k), op.indexer_topk(qi, w, segs, k)
    assert len(got) == 3 and all(torch.equal(g, x) for g, x in zip(got, want))
    assert (got[1] == -1).all() and (got[0] >= 0).any() and (got[2] >= 0).any()
    small = [(old[:, :4], torch.full_like(n_old, 4)), (new[:, :2], torch.full_like(n_new, 2))]
    got, want = K.indexer_topk(qi, w, small, k), op.indexer_topk(qi, w, small, k)
    assert got[0].shape == (b, s, 6) and all(torch.equal(g, x) for g, x in zip(got, want))


def test_indexer_topk_tie_order_and_pruning(K, gen):
    """Hand-built scores (one head, one-hot keys, weight 1 → score_j = q·key_j exactly): equal scores come
    out in ascending index order, a block whose best only *ties* the current k-th (at a higher index) is
    rightly skipped, and a later block with a strictly better score still enters."""
    n, c, k = 70, 16, 5
    vals = torch.full((n,), 1.0)
    vals[3], vals[9], vals[40], vals[41], vals[66] = 2.0, 2.0, 2.0, 3.0, 2.0
    vals[20:36] = 1.5                               # a whole middle block that only ties the k-th best
    qi = torch.zeros(1, 1, 1, c)
    qi[..., 0] = 1.0
    keys = torch.zeros(1, n, c)
    keys[0, :, 0] = vals
    keys[0, :, 1:] = torch.randn(n, c - 1, generator=gen)      # orthogonal to qi: no effect on scores
    (got,) = K.indexer_topk(qi, torch.ones(1, 1, 1), [(keys, torch.tensor([[n]]))], k)
    assert got.tolist() == [[[41, 3, 9, 40, 66]]]
    (got,) = K.indexer_topk(qi, torch.ones(1, 1, 1), [(keys, torch.tensor([[40]]))], k)
    assert got.tolist() == [[[3, 9, 20, 21, 22]]]
    a, bb = K.indexer_topk(qi, torch.ones(1, 1, 1), [(keys[:, :40], torch.tensor([[40]])),
                                                     (keys[:, 40:], torch.tensor([[30]]))], k)
    assert a.tolist() == [[[-1, 3, 9, -1, -1]]] and bb.tolist() == [[[1, -1, -1, 0, 26]]]


@pytest.mark.parametrize("hc,d", [(4, 200), (3, 70)])
def test_hc_pre_and_post(K, op, gen, hc, d):
    b, s = 2, 3
    h = torch.randn(b, s, hc, d, generator=gen)
    mix = (2 + hc) * hc
    fn = 0.05 * torch.randn(mix, hc * d, generator=gen)
    base = 0.1 * torch.randn(mix, generator=gen)
    scale = 1 + 0.1 * torch.randn(3, generator=gen)
    got = K.hc_pre(h, fn, base, scale, 20, 1e-6, 1e-6)
    want = op.hc_pre(h, fn, base, scale, 20, 1e-6, 1e-6)
    for g, w_ in zip(got, want):
        _close(g, w_)
    f = torch.randn(b, s, d, generator=gen)
    _close(K.hc_post(f, h, want[1], want[2]), op.hc_post(f, h, want[1], want[2]))


def _bank(fmt, e, d, i, rng):
    from dsv4.backends.cuda.weights import ExpertBank, TorchQuant, to_torch_quant
    qfn = quant.quantize_fp4 if fmt == "fp4" else quant.quantize_fp8_block

    def stack(shape):
        ts = [to_torch_quant(qfn(rng.standard_normal(shape) / np.sqrt(shape[1])), "cpu") for _ in range(e)]
        return TorchQuant(fmt, torch.stack([t.data for t in ts]), torch.stack([t.scale for t in ts]), ts[0].shape)
    return ExpertBank(stack((i, d)), stack((d, i)), stack((i, d)), e)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_moe_grouped(K, op, gen, fmt):
    e, d, i, n, k = 6, 96, 160, 19, 3
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    bank = _bank(fmt, e, d, i, rng)
    x = 3 * torch.randn(n, d, generator=gen)
    idx = torch.stack([torch.randperm(e - 1, generator=gen)[:k] for _ in range(n)])   # expert e−1 unused
    wts = torch.rand(n, k, generator=gen)
    _close(K.moe(x, idx, wts, bank, 2.0), op.moe(x, idx, wts, bank, 2.0))


@pytest.mark.parametrize("m", [1, 70])
def test_fp8_linear(K, op, gen, m):
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    from dsv4.backends.cuda.weights import to_torch_quant
    w = to_torch_quant(quant.quantize_fp8_block(rng.standard_normal((200, 300))), "cpu")
    x = torch.randn(m, 300, generator=gen)
    _close(K.fp8_linear(x, w), op.linear(x, w))


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_whole_model_on_kernels(tiny_dir, rand_ids, fmt):
    """Every composite on its kernel (forced): prefill then decode steps vs the float64 oracle storing the
    same state format.  Short, because the interpreter runs each program in Python (~5 s per token)."""
    import dsv4
    ids = rand_ids(8, seed=int(np.random.default_rng().integers(1 << 30)))
    ref = dsv4.load(tiny_dir, backend="reference", dtype="float64", context=64,
                    state_format=fmt).forward(ids, full_precision=True)
    m = dsv4.load(tiny_dir, backend="cuda", dtype="float32", context=64, kernels=True, state_format=fmt)
    assert m.runner.ops.kernels
    st, outs = m.new_state(), []
    logits, st = m.step(st, ids[None, :6])
    outs.append(logits[0])
    for i in (6, 7):
        logits, st = m.step(st, ids[None, i:i + 1])
        outs.append(logits[0])
    got = np.concatenate(outs, 0)
    assert float((np.abs(got - ref).max(-1) / np.abs(ref).max(-1)).max()) <= 1e-4

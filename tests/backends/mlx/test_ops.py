"""MlxOps primitives and composites against the NumPy reference ops on random inputs (ladder rung 1)."""

import mlx.core as mx
import numpy as np
import pytest

from dsv4.backends.mlx import ops as ops_mod
from dsv4.backends.mlx import qlinear
from dsv4.backends.mlx.ops import MlxOps
from dsv4.portable import quant
from dsv4.portable.reference import NumpyOps

M, R = MlxOps("float32"), NumpyOps("float64")


def _np(x):
    return M.to_numpy(x)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_topk_breaks_ties_toward_lower_index():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, (3, 50)).astype(np.float32)           # many ties
    x[0, 10:] = -np.inf
    got = _np(M.topk(mx.array(x), 12))
    np.testing.assert_array_equal(got, R.topk(x.astype(np.float64), 12))
    assert got.dtype == np.int32


def test_gather_and_scatter_rows_are_functional():
    rng = np.random.default_rng(2)
    buf, rows = _rand(rng, 2, 9, 5), _rand(rng, 2, 3, 5)
    idx = np.array([[1, 8, 4], [0, 2, 7]])
    mb = mx.array(buf)
    out = M.scatter_rows(mb, mx.array(idx), mx.array(rows))
    np.testing.assert_array_equal(_np(out), R.scatter_rows(buf, idx, rows))
    np.testing.assert_array_equal(_np(mb), buf)                    # the input state is untouched
    np.testing.assert_array_equal(_np(M.gather_rows(out, mx.array(idx))), rows)


def test_sink_attention_matches_reference():
    rng = np.random.default_rng(3)
    q, kv, sink = _rand(rng, 2, 3, 4, 16), _rand(rng, 2, 11, 16), _rand(rng, 4)
    idx = rng.integers(-1, 11, (2, 3, 7))
    idx[0, 0] = -1                                                 # a query that sees only the sink
    got = M.sink_attention(mx.array(q), mx.array(kv), mx.array(idx.astype(np.int32)), mx.array(sink), 0.25)
    want = R.sink_attention(q.astype(np.float64), kv.astype(np.float64), idx, sink.astype(np.float64), 0.25)
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-6)


def test_indexer_topk_matches_reference():
    rng = np.random.default_rng(4)
    qi, w, keys = _rand(rng, 1, 5, 4, 8), _rand(rng, 1, 5, 4), _rand(rng, 1, 12, 8)
    visible = np.array([[0, 2, 5, 9, 12]])
    got = M.indexer_topk(mx.array(qi), mx.array(w), mx.array(keys), mx.array(visible.astype(np.int32)), 4)
    want = R.indexer_topk(qi.astype(np.float64), w.astype(np.float64), keys.astype(np.float64), visible, 4)
    np.testing.assert_array_equal(_np(got), want)


def test_hc_pre_and_post_match_reference():
    rng = np.random.default_rng(5)
    h, fn, base, scale = _rand(rng, 2, 3, 4, 32), 0.1 * _rand(rng, 24, 128), _rand(rng, 24), 1 + 0.1 * _rand(rng, 3)
    got = M.hc_pre(*(mx.array(a) for a in (h, fn, base, scale)), 20, 1e-6, 1e-6)
    want = R.hc_pre(*(a.astype(np.float64) for a in (h, fn, base, scale)), 20, 1e-6, 1e-6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(_np(g), w, rtol=1e-5, atol=1e-6)
    f = _rand(rng, 2, 3, 32)
    np.testing.assert_allclose(_np(M.hc_post(mx.array(f), mx.array(h), got[1], got[2])),
                               R.hc_post(f.astype(np.float64), h.astype(np.float64), want[1], want[2]),
                               rtol=1e-5, atol=1e-5)


def _fp4_experts(rng, e, d, inter):
    """`e` random FP4 experts: the (w1, w2, w3) QuantWeights and their stacked MLX `ExpertBank`."""
    raw = [(quant.quantize_fp4(_rand(rng, inter, d) / 8), quant.quantize_fp4(_rand(rng, d, inter) / 10),
            quant.quantize_fp4(_rand(rng, inter, d) / 8)) for _ in range(e)]
    bank = qlinear.ExpertBank(*(qlinear.stack([qlinear.from_quant(t[j]) for t in raw]) for j in range(3)))
    return raw, bank


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_over_expert_bank_matches_dense_reference(dtype):
    rng = np.random.default_rng(6)
    e, d, inter, n, k = 6, 64, 96, 9, 2
    raw, bank = _fp4_experts(rng, e, d, inter)
    x = _rand(rng, n, d)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    wts = rng.uniform(0.2, 1.0, (n, k)).astype(np.float32)
    ops, ref = MlxOps(dtype), NumpyOps("bfloat16" if dtype == "bfloat16" else "float64")
    xin = ref.act(x.astype(ref.dt))
    got = ops.moe(ops.act(mx.array(x)), mx.array(idx.astype(np.int32)), mx.array(wts), bank, 10.0)
    want = ref.moe(xin, idx, wts.astype(ref.dt), raw, 10.0)
    np.testing.assert_allclose(_np(got), want, rtol=2e-5 if dtype == "float32" else 1e-2, atol=1e-5)


def test_moe_expert_sorted_prefill_path_equals_the_per_pair_gather():
    """Prefill-sized MoE grouped by expert (pairs ≥ SORT_PAIRS, the GPU default, forced here) gives the
    per-pair gather's values (token by token, as decode runs) and the dense reference."""
    rng = np.random.default_rng(11)
    e, d, inter, n, k = 7, 64, 96, 40, 3
    raw, bank = _fp4_experts(rng, e, d, inter)
    x = _rand(rng, n, d)
    idx = np.stack([rng.choice(e - 1, k, replace=False) for _ in range(n)])   # expert e-1 gets no token
    wts = rng.uniform(0.2, 1.0, (n, k)).astype(np.float32)
    assert n * k >= ops_mod.SORT_PAIRS > k
    ops = MlxOps("float32", sort_experts=True)
    got = _np(ops.moe(mx.array(x), mx.array(idx.astype(np.int32)), mx.array(wts), bank, 10.0))
    rows = [_np(ops.moe(mx.array(x[i:i + 1]), mx.array(idx[i:i + 1].astype(np.int32)), mx.array(wts[i:i + 1]),
                        bank, 10.0)) for i in range(n)]
    np.testing.assert_allclose(got, np.concatenate(rows), rtol=1e-6, atol=1e-7)
    want = R.moe(x.astype(np.float64), idx, wts.astype(np.float64), raw, 10.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_grouped_linear_matches_reference_decomposition():
    rng = np.random.default_rng(7)
    qw = quant.quantize_fp8_block(_rand(rng, 4 * 32, 64))
    x = _rand(rng, 2, 3, 4, 64)
    got = M.grouped_linear(mx.array(x), qlinear.from_quant(qw), 4)
    want = R.grouped_linear(x.astype(np.float64), qw, 4)
    np.testing.assert_allclose(_np(got), want, rtol=1e-4, atol=1e-5)

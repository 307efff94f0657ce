"""MlxOps primitives and composites against the NumPy reference ops on random inputs (ladder rung 1)."""

import mlx.core as mx
import numpy as np
import pytest

from dsv4.backends.mlx import ops as ops_mod
from dsv4.backends.mlx import qlinear
from dsv4.backends.mlx.ops import MlxOps
from dsv4.portable import quant
from dsv4.portable.ops import Segment
from dsv4.portable.reference import NumpyOps

M, R = MlxOps("float32"), NumpyOps("float64")


def _np(x):
    return M.to_numpy(x)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("k", [1, 4, 12, 49, 50, 60])
def test_topk_partial_selection_keeps_the_tie_rule(k):
    """Ties-heavy rows (4 distinct values, −inf tails): the partial selection picks and orders exactly what a
    stable full sort does — equal scores → the lower index first."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, (2, 3, 50)).astype(np.float32)
    x[0, 0, 10:] = -np.inf
    x[1, 2] = 2.0                                                  # a row of one value
    got = _np(M.topk(mx.array(x), k))
    want = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(got, want)
    if k < 50:
        np.testing.assert_array_equal(got, R.topk(x.astype(np.float64), k))
    assert got.dtype == np.int32


def test_write_rows_writes_the_rows_in_the_buffer_dtype():
    rng = np.random.default_rng(2)
    buf, rows = _rand(rng, 2, 9, 5), _rand(rng, 2, 3, 5)
    idx = np.array([[1, 8, 4], [0, 2, 7]])
    mb = M.write_rows(mx.array(buf), mx.array(idx.astype(np.int32)), mx.array(rows))
    np.testing.assert_array_equal(_np(mb), R.write_rows(buf.copy(), idx, rows))
    np.testing.assert_array_equal(_np(M.gather_rows(mb, mx.array(idx.astype(np.int32)))), rows)
    bb = M.write_rows(M.state_buffer((2, 9, 5), "act"), mx.array(idx.astype(np.int32)), mx.array(rows))
    assert bb.dtype == mx.float32
    b16 = MlxOps("bfloat16")
    wb = b16.write_rows(b16.state_buffer((2, 9, 5), "act"), mx.array(idx.astype(np.int32)), mx.array(rows))
    assert wb.dtype == mx.bfloat16
    np.testing.assert_array_equal(_np(wb)[0, 1], quant.round_bf16(rows[0, 0]))


def test_write_rows_reuses_an_unshared_buffer():
    """MLX donates a scatter's input when nothing else holds it: the write is in place."""
    def address(a):
        view = np.array(a, copy=False)
        return view.ctypes.data

    buf = mx.zeros((2, 300, 64))
    mx.eval(buf)
    before = address(buf)
    out = M.write_rows(buf, mx.array([[3], [7]], dtype=mx.int32), mx.ones((2, 1, 64)))
    del buf
    mx.eval(out)
    assert address(out) == before


def test_state_buffers_read_and_trim():
    b16 = MlxOps("bfloat16")
    kinds = {"act": mx.bfloat16, "hp": mx.float32, "int": mx.int32, "u8": mx.uint8}
    for kind, dt in kinds.items():
        z = b16.state_buffer((1, 3, 2), kind)
        assert z.dtype == dt and not _np(z).any()
    buf = mx.arange(2 * 10 * 3, dtype=mx.float32).reshape(2, 10, 3)
    assert b16.read(buf) is buf
    assert M.trim(buf, mx.array([[2, 4], [1, 0]], dtype=mx.int32)).shape == (2, 4, 3)
    ops = MlxOps("float32")
    ops.tracing = True
    assert ops.trim(buf, mx.array([[2]], dtype=mx.int32)).shape == (2, 10, 3)


def _codec_input(rng):
    """Values across many binades, exact midpoints of the FP8 grid, an all-zero and a tiny block."""
    x = (rng.standard_normal((3, 4, 256)) * np.exp(rng.uniform(-12, 12, (3, 4, 1)))).astype(np.float32)
    x[0, 0, :64] = 0.0
    x[0, 1, :64] = 1e-30
    grid = np.unique(np.abs(quant.e4m3_to_f32(np.arange(127, dtype=np.uint8))))
    x[1, 0] = np.resize(np.concatenate([(grid[1:] + grid[:-1]) / 2, -grid]), 256) / 7.0
    x[1, 1, ::3] = -0.0
    return x


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_codecs_are_bit_exact_to_quant(fmt):
    rng = np.random.default_rng(21)
    x = _codec_input(rng)
    block = 64 if fmt == "fp8" else 32
    enc, dec = (M.encode_fp8, M.decode_fp8) if fmt == "fp8" else (M.encode_fp4, M.decode_fp4)
    want = (quant.encode_fp8_blocks if fmt == "fp8" else quant.encode_fp4_blocks)(x, block)
    codes, scales = enc(mx.array(x), block)
    assert codes.dtype == scales.dtype == mx.uint8
    np.testing.assert_array_equal(_np(codes), want[0])
    np.testing.assert_array_equal(_np(scales), want[1])
    back = (quant.decode_fp8_blocks if fmt == "fp8" else quant.decode_fp4_blocks)(*want, block)
    np.testing.assert_array_equal(_np(dec(codes, scales, block)), back)
    assert np.abs(back - x).max() > 0                               # a lossy format: the test can fail
    b16 = MlxOps("bfloat16")                                        # bf16 inputs encode their exact values
    xb = quant.round_bf16(x)
    np.testing.assert_array_equal(_np(enc(b16.act(mx.array(x)), block)[0]),
                                  (quant.encode_fp8_blocks if fmt == "fp8" else quant.encode_fp4_blocks)(xb, block)[0])


def test_sink_attention_over_segments_matches_reference():
    rng = np.random.default_rng(3)
    q, kv, sink = _rand(rng, 2, 3, 4, 16), _rand(rng, 2, 11, 16), _rand(rng, 4)
    win, rows = _rand(rng, 2, 6, 16), _rand(rng, 2, 3, 5, 16)
    idx = rng.integers(-1, 11, (2, 3, 7))
    idx[0, 0] = -1
    mask = rng.random((2, 3, 6)) < 0.6
    valid = rng.random((2, 3, 5)) < 0.5
    valid[0, 0] = mask[0, 0] = False                                # a query that sees only the sink

    def segs(o, conv, ci):
        return [Segment.gather(conv(kv), ci(idx)), Segment.dense(conv(win), ci(mask)),
                Segment.per_query(conv(rows), ci(valid))]
    got = M.sink_attention(mx.array(q), segs(M, mx.array, lambda a: mx.array(a.astype(np.int32) if a.dtype != bool
                                                                                   else a)), mx.array(sink), 0.25)
    want = R.sink_attention(q.astype(np.float64), segs(R, lambda a: a.astype(np.float64), lambda a: a),
                            sink.astype(np.float64), 0.25)
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-6)


def test_indexer_topk_over_segments_matches_reference():
    rng = np.random.default_rng(4)
    qi, w = _rand(rng, 1, 5, 4, 8), _rand(rng, 1, 5, 4)
    old, new = _rand(rng, 1, 9, 8), _rand(rng, 1, 3, 8)
    n_old, n_new = np.array([[0, 2, 5, 9, 9]]), np.array([[0, 0, 1, 2, 3]])
    got = M.indexer_topk(mx.array(qi), mx.array(w), [(mx.array(old), mx.array(n_old.astype(np.int32))),
                                                     (mx.array(new), mx.array(n_new.astype(np.int32)))], 4)
    want = R.indexer_topk(qi.astype(np.float64), w.astype(np.float64),
                          [(old.astype(np.float64), n_old), (new.astype(np.float64), n_new)], 4)
    for g, wv in zip(got, want):
        np.testing.assert_array_equal(_np(g), wv)


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
    """Prefill-sized MoE grouped by expert (pairs ≥ SORT_PAIRS, the default on every device) gives the
    per-pair gather's values (token by token, as decode runs) and the dense reference."""
    rng = np.random.default_rng(11)
    e, d, inter, n, k = 7, 64, 96, 40, 3
    raw, bank = _fp4_experts(rng, e, d, inter)
    x = _rand(rng, n, d)
    idx = np.stack([rng.choice(e - 1, k, replace=False) for _ in range(n)])   # expert e-1 gets no token
    wts = rng.uniform(0.2, 1.0, (n, k)).astype(np.float32)
    assert n * k >= ops_mod.SORT_PAIRS > k
    ops = MlxOps("float32")
    assert ops.sort_experts
    got = _np(ops.moe(mx.array(x), mx.array(idx.astype(np.int32)), mx.array(wts), bank, 10.0))
    rows = [_np(ops.moe(mx.array(x[i:i + 1]), mx.array(idx[i:i + 1].astype(np.int32)), mx.array(wts[i:i + 1]),
                        bank, 10.0)) for i in range(n)]
    np.testing.assert_allclose(got, np.concatenate(rows), rtol=1e-6, atol=1e-7)
    want = R.moe(x.astype(np.float64), idx, wts.astype(np.float64), raw, 10.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_dense_run_decodes_each_weight_once_and_matches_the_quantized_kernel():
    rng = np.random.default_rng(12)
    q = qlinear.from_quant(quant.quantize_fp8_block(_rand(rng, 96, 128)))
    x = mx.array(_rand(rng, 40, 128))
    ops = MlxOps("float32")
    plain = _np(ops.linear(x, q))
    with ops.dense_run():
        a, b = _np(ops.linear(x, q)), _np(ops.linear(x, q))
        held = dict(ops._run or {})
    assert ops._run is None
    if ops_mod.on_cpu():
        assert list(held) == [id(q)]
    np.testing.assert_allclose(a, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a, b)


def test_grouped_linear_matches_reference_decomposition():
    rng = np.random.default_rng(7)
    qw = quant.quantize_fp8_block(_rand(rng, 4 * 32, 64))
    x = _rand(rng, 2, 3, 4, 64)
    got = M.grouped_linear(mx.array(x), qlinear.from_quant(qw), 4)
    want = R.grouped_linear(x.astype(np.float64), qw, 4)
    np.testing.assert_allclose(_np(got), want, rtol=1e-4, atol=1e-5)

"""Weight forms (qlinear.py): the native FP4/FP8 mappings are bit-exact, requantized forms stay within
the documented weight errors, and the grouped / stacked views compute what their dense forms do."""

import mlx.core as mx
import numpy as np
import pytest

from dsv4.backends.mlx import qlinear
from dsv4.portable import quant


def _weights(seed, out_f=200, in_f=320):
    """Random normal weights; 200 rows is not a multiple of the 128-row FP8 block on purpose."""
    return np.random.default_rng(seed).standard_normal((out_f, in_f)).astype(np.float32)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fp4_maps_to_mxfp4_bit_exactly():
    qw = quant.quantize_fp4(_weights(1))
    q = qlinear.from_quant(qw)
    assert (q.mode, q.bits) == ("mxfp4", 4)
    assert q.nbytes == qw.data.nbytes + qw.scale.nbytes
    np.testing.assert_array_equal(np.array(q.dense()), quant.dequantize(qw))


@pytest.mark.parametrize("f32_scale", [False, True])
def test_fp8_maps_to_mxfp8_bit_exactly(f32_scale):
    qw = quant.quantize_fp8_block(_weights(2), f32_scale=f32_scale)
    q = qlinear.from_quant(qw)
    assert (q.mode, q.bits) == ("mxfp8", 8)
    np.testing.assert_array_equal(np.array(q.dense()), quant.dequantize(qw))


def test_fp8_with_non_power_of_two_scales_falls_back_to_affine8():
    qw = quant.quantize_fp8_block(_weights(3), f32_scale=True)
    odd = quant.QuantWeight("fp8", qw.data, (qw.scale * np.float32(1.37)).astype(np.float32), qw.shape)
    q = qlinear.from_quant(odd)
    assert (q.mode, q.bits) == ("affine", 8)
    assert _rel(np.array(q.dense()), quant.dequantize(odd)) < 0.012


@pytest.mark.parametrize("src,bits,q_mode,mode,bound", [
    ("fp8", 4, "mxfp4", "mxfp4", 0.14),
    ("fp8", 8, "affine", "affine", 0.010),
    ("fp8", 4, "affine", "affine", 0.10),
    ("fp4", 8, "affine", "affine", 0.010),
    ("fp4", 4, "affine", "affine", 0.10),
    ("fp4", 4, "mxfp4", "mxfp4", 0.0),
])
def test_requantized_weight_error_within_documented_bound(src, bits, q_mode, mode, bound):
    w = _weights(4, 256, 512)
    qw = quant.quantize_fp8_block(w) if src == "fp8" else quant.quantize_fp4(w)
    q = qlinear.from_quant(qw, bits, q_mode)
    assert (q.mode, q.bits) == (mode, bits)
    err = _rel(np.array(q.dense()), quant.dequantize(qw))
    assert err <= bound
    if bound:
        assert err > bound / 20, "suspiciously exact: was the weight requantized at all?"


@pytest.mark.parametrize("make", [quant.quantize_fp4, quant.quantize_fp8_block])
def test_apply_matches_dense_matmul(make):
    qw = make(_weights(5))
    q = qlinear.from_quant(qw)
    x = np.random.default_rng(6).standard_normal((7, 320)).astype(np.float32)
    np.testing.assert_allclose(np.array(q.apply(mx.array(x))), x @ quant.dequantize(qw).T, rtol=1e-4, atol=1e-4)


def test_grouped_view_applies_each_row_block_to_its_group():
    qw = quant.quantize_fp8_block(_weights(7, 4 * 48, 256))
    q = qlinear.from_quant(qw)
    x = np.random.default_rng(8).standard_normal((5, 4, 1, 256)).astype(np.float32)
    y = np.array(q.grouped(4).apply(mx.array(x)))                                  # [5, 4, 1, 48]
    w = quant.dequantize(qw).reshape(4, 48, 256)
    want = np.einsum("ngk,grk->ngr", x[:, :, 0], w)
    np.testing.assert_allclose(y[:, :, 0], want, rtol=1e-4, atol=1e-4)


def test_stacked_experts_gather_the_routed_expert():
    rng = np.random.default_rng(9)
    qws = [quant.quantize_fp4(rng.standard_normal((64, 96)).astype(np.float32)) for _ in range(5)]
    bank = qlinear.stack([qlinear.from_quant(q) for q in qws])
    x = rng.standard_normal((6, 1, 1, 96)).astype(np.float32)
    idx = rng.integers(0, 5, (6, 2)).astype(np.int32)
    y = np.array(bank.apply(mx.array(x), mx.array(idx)))                           # [6, 2, 1, 64]
    for n in range(6):
        for j in range(2):
            want = x[n, 0, 0] @ quant.dequantize(qws[idx[n, j]]).T
            np.testing.assert_allclose(y[n, j, 0], want, rtol=1e-4, atol=1e-4)


def test_bad_options_are_rejected():
    qw = quant.quantize_fp4(_weights(10))
    with pytest.raises(ValueError, match="q_mode"):
        qlinear.from_quant(qw, 4, "nf4")
    with pytest.raises(ValueError, match="bits"):
        qlinear.from_quant(qw, 3, "affine")

"""Codecs and quantizers of portable/quant.py against hand-computed values and format error bounds."""

import numpy as np
import pytest

from dsv4.portable.quant import (E2M1, QuantWeight, act_fp4_round, act_fp8_round, bf16_to_f32, dequantize,
                                 e4m3_to_f32, e8m0_to_f32, f32_to_bf16, f32_to_e2m1, f32_to_e4m3, f32_to_e8m0,
                                 hadamard, pack_fp4, quantize_fp4, quantize_fp8_block, round_bf16, unpack_fp4)

rng = np.random.default_rng(1234)


# ---------------------------------------------------------------------- bf16
def test_bf16_round_trip_and_ties():
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 3.4e38, np.inf], np.float32)
    bits = f32_to_bf16(x)
    # 1+2^-8 ties to even (down), 1+3·2^-8 ties to even (up), just above the tie rounds up, overflow → inf
    assert bits.tolist() == [0x3F80, 0xC020, 0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7F80]
    assert bf16_to_f32(bits[:5]).tolist() == [1.0, -2.5, 1.0, 1 + 2 ** -6, 1 + 2 ** -7]


def test_bf16_nan_kept_and_float64_rounds_once():
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]
    # float64 value just above a bf16 tie: a detour through float32 would land on the tie and round down
    x = np.array([1 + 2 ** -8 + 2 ** -40])
    assert f32_to_bf16(x)[0] == 0x3F81
    r = round_bf16(x)
    assert r.dtype == np.float64 and r[0] == 1 + 2 ** -7


def test_round_bf16_matches_bit_codec_on_random_values():
    x = (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32)
    r = round_bf16(x)
    assert r.dtype == np.float32
    np.testing.assert_array_equal(r, bf16_to_f32(f32_to_bf16(x)))
    np.testing.assert_array_equal(round_bf16(x.astype(np.float64)), r.astype(np.float64))
    assert np.all(np.abs(r - x) <= np.abs(x) * 2 ** -8)


# ---------------------------------------------------------------------- e4m3
def test_e4m3_hand_values():
    x = [448, 449, 464, 465, 1e6, -0.0, 2 ** -9, 2 ** -10, 1.5 * 2 ** -10, 1.0625, 1.1875, -3.0, 0.015625]
    assert f32_to_e4m3(x).tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x80, 0x01, 0x00, 0x01, 0x38, 0x3A, 0xC4, 0x08]
    assert f32_to_e4m3([-1e6])[0] == 0xFE
    assert f32_to_e4m3([np.nan, np.inf, -np.inf]).tolist() == [0x7F, 0x7F, 0xFF]


def test_e4m3_decode_hand_values():
    v = e4m3_to_f32(np.array([0x7E, 0xFE, 0x01, 0x07, 0x08, 0x38, 0x80, 0x7F, 0xFF], np.uint8))
    assert v[:6].tolist() == [448, -448, 2 ** -9, 7 * 2 ** -9, 2 ** -6, 1.0]
    assert np.signbit(v[6]) and v[6] == 0
    assert np.isnan(v[7]) and np.isnan(v[8])


def test_e4m3_all_codes_round_trip():
    codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], np.uint8)
    np.testing.assert_array_equal(f32_to_e4m3(e4m3_to_f32(codes)), codes)


# ---------------------------------------------------------------------- e8m0
def test_e8m0_bytes():
    v = e8m0_to_f32(np.array([0, 127, 254, 255, 130], np.uint8))
    assert v[0] == np.float32(2.0 ** -127) and v[1] == 1.0 and v[2] == np.float32(2.0 ** 127) and v[4] == 8.0
    assert np.isnan(v[3])
    assert f32_to_e8m0([2.0 ** -127, 1.0, 2.0 ** 127, 0.25, np.nan]).tolist() == [0, 127, 254, 125, 255]
    with pytest.raises(ValueError, match="powers of two"):
        f32_to_e8m0([3.0])


# ---------------------------------------------------------------------- e2m1 / packing
def test_e2m1_rounding_and_saturation():
    x = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.1, -2.9, -6.5]
    # ties go to the even code: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4; beyond 6 saturates
    assert E2M1[f32_to_e2m1(x)].tolist() == [0, 1, 1, 2, 2, 4, 4, 6, 6, -0.0, -3, -6]
    assert f32_to_e2m1(E2M1).tolist() == list(range(16))
    with pytest.raises(ValueError, match="NaN"):
        f32_to_e2m1([np.nan])


def test_fp4_pack_low_nibble_first():
    packed = pack_fp4(np.array([[1, 2, 15, 7]], np.uint8))
    assert packed.tolist() == [[0x21, 0x7F]]
    n = rng.integers(0, 16, (3, 10), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_fp4(pack_fp4(n)), n)
    with pytest.raises(ValueError, match="even"):
        pack_fp4(np.ones((2, 3), np.uint8))


# ---------------------------------------------------------------------- weights
def test_fp8_dequantize_hand_built_odd_shape():
    m, n = 130, 200                       # edge blocks of 2 rows and 72 columns
    data = np.full((m, n), 0x38, np.uint8)                    # e4m3 1.0 everywhere
    data[129, 199] = 0x40                                     # 2.0 in the corner block
    scale = np.array([[127, 128], [126, 130]], np.uint8)      # 1, 2, 0.5, 8
    w = dequantize(QuantWeight("fp8", data, scale, (m, n)))
    assert w.shape == (m, n) and w.dtype == np.float32
    assert (w[0, 0], w[127, 128], w[128, 0], w[129, 199], w[129, 198]) == (1, 2, 0.5, 16, 8)


def test_fp4_dequantize_hand_built():
    nib = np.zeros((2, 64), np.uint8)
    nib[0, 0], nib[0, 1], nib[0, 33], nib[1, 63] = 7, 9, 2, 15              # 6, -0.5, 1, -6
    scale = np.array([[127, 129], [127, 126]], np.uint8)                    # 1, 4 / 1, 0.5
    w = QuantWeight("fp4", pack_fp4(nib), scale, (2, 64)).dequantize(np.float64)
    assert w.dtype == np.float64
    assert (w[0, 0], w[0, 1], w[0, 33], w[1, 63]) == (6, -0.5, 4, -3)


def test_float_weight_decodes_bf16_bits():
    bits = f32_to_bf16(np.array([[1.5, -2.0]], np.float32))
    assert QuantWeight("float", bits, None, (1, 2)).dequantize().tolist() == [[1.5, -2.0]]


def test_quant_weight_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="needs scale"):
        QuantWeight("fp8", np.ones((130, 200), np.uint8), np.ones((1, 2), np.uint8), (130, 200))
    with pytest.raises(ValueError, match="needs data"):
        QuantWeight("fp4", np.ones((4, 64), np.uint8), np.ones((4, 2), np.uint8), (4, 64))
    with pytest.raises(ValueError, match="fmt"):
        QuantWeight("int4", np.ones((4, 64), np.uint8), None, (4, 64))


def test_fp8_quantize_round_trip_error_bound():
    w = rng.standard_normal((130, 200)) * np.exp(rng.uniform(-4, 4, (130, 200)))
    q = quantize_fp8_block(w)
    assert q.data.dtype == np.uint8 and q.scale.shape == (2, 2) and q.scale.dtype == np.uint8
    s = np.repeat(np.repeat(e8m0_to_f32(q.scale), 128, 0), 128, 1)[:130, :200]
    for i in range(2):
        for j in range(2):                          # each block scale is the smallest power of two ≥ amax/448
            amax = np.abs(w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]).max()
            assert 224 < amax / e8m0_to_f32(q.scale[i, j]) <= 448
    err = np.abs(q.dequantize(np.float64) - w)
    assert np.all(err <= np.maximum(np.abs(w) * 2 ** -4, s * 2 ** -10))           # half an e4m3 step
    f = quantize_fp8_block(w, f32_scale=True)
    assert f.scale.dtype == np.float32
    np.testing.assert_array_equal(f.dequantize(), q.dequantize())


def test_fp4_quantize_round_trip_error_bound():
    w = rng.standard_normal((48, 96))
    q = quantize_fp4(w)
    assert q.data.shape == (48, 48) and q.scale.shape == (48, 3)
    s = np.repeat(e8m0_to_f32(q.scale), 32, 1)
    err = np.abs(q.dequantize(np.float64) - w)
    assert np.all(err <= 0.25 * np.maximum(np.abs(w), s))                          # half an e2m1 step
    assert np.abs(q.dequantize() - w).mean() < 0.1


# ---------------------------------------------------------------------- activation emulation
def test_act_fp8_round_hand_values():
    x = np.zeros((1, 128), np.float32)
    x[0, :4] = [448.0, 1.0, 1.0625, 0.3]          # amax 448 → scale 1
    y = act_fp8_round(x)
    assert y.dtype == np.float32
    assert y[0, :4].tolist() == [448.0, 1.0, 1.0, np.float32(0.3125)]
    x[0, 0] = 449.0                               # amax/448 just above 1 → scale 2, grid step 2 at 1
    assert act_fp8_round(x)[0, :3].tolist() == [448.0, 1.0, 1.0]
    tiny = np.full((1, 128), 1e-6)                # amax floored at 1e-4 → scale 2^-22
    assert act_fp8_round(tiny)[0, 0] == 4 * 2.0 ** -22


def test_act_fp8_round_blocks_and_dtypes():
    x = rng.standard_normal((3, 2, 256)) * np.array([1.0, 1000.0]).repeat(128)
    for dt in (np.float32, np.float64):
        y = act_fp8_round(x.astype(dt))
        assert y.dtype == dt and y.shape == x.shape
        s0 = 2.0 ** np.ceil(np.log2(np.abs(x[..., :128]).max(-1, keepdims=True) / 448))
        assert np.all(np.abs(y[..., :128] - x[..., :128]) <= np.maximum(np.abs(x[..., :128]) / 16, s0 / 1024))
        assert np.abs(y[..., 128:] - x[..., 128:]).max() > 1        # the big block has a coarse grid
    mixed = np.concatenate([np.full(64, 0.001), np.full(64, 400.0)])
    assert act_fp8_round(mixed)[0] == 2.0 ** -9                   # one scale (1): 0.001 on the subnormal grid
    assert act_fp8_round(mixed, block=64)[0] == 256 * 2.0 ** -18  # own scale 2^-18 for the small half
    with pytest.raises(ValueError, match="multiple"):
        act_fp8_round(np.ones((2, 100)))


def test_act_fp4_round_hand_values():
    x = np.zeros(32)
    x[:5] = [6.0, 2.5, -0.26, 5.0, 0.2]          # amax 6 → scale 1
    assert act_fp4_round(x)[:5].tolist() == [6.0, 2.0, -0.5, 4.0, 0.0]
    x[0] = 12.0                                  # scale 2: grid 0, 1, 2, 3, 4, 6, 8, 12
    assert act_fp4_round(x)[:5].tolist() == [12.0, 2.0, -0.0, 4.0, 0.0]
    y = act_fp4_round(rng.standard_normal((4, 128)).astype(np.float32))
    assert y.dtype == np.float32 and len(np.unique(np.abs(y[0, :32]))) <= 8


def test_hadamard():
    h = hadamard(128)
    assert h.dtype == np.float32 and h[0, 0] == h[5, 0] == np.float32(128 ** -0.5)
    assert h[1, 1] == -h[0, 0] and h[3, 2] == -h[0, 0] and h[2, 3] == -h[0, 0]
    np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
    np.testing.assert_array_equal(hadamard(4, np.float64) * 2, [[1, 1, 1, 1], [1, -1, 1, -1],
                                                                [1, 1, -1, -1], [1, -1, -1, 1]])
    with pytest.raises(ValueError):
        hadamard(12)

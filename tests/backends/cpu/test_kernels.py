"""The stored-format kernels against `portable.quant`'s decomposition (dequantize, then multiply in
float64) on awkward shapes and on the codes at the edges of each format."""

import numpy as np
import pytest

pytest.importorskip("numba")

from dsv4.backends.cpu import kernels  # noqa: E402
from dsv4.backends.cpu.weights import kernel_form  # noqa: E402
from dsv4.portable import quant  # noqa: E402

RNG = np.random.default_rng(18)


def _weights(fmt, n, k):
    w = RNG.standard_normal((n, k)).astype(np.float32)
    if fmt == "fp8":
        return quant.quantize_fp8_block(w)
    if fmt == "fp4":
        return quant.quantize_fp4(w)
    return quant.QuantWeight("float", quant.f32_to_bf16(w), None, (n, k))


def _product(cw, x, group_rows=None):
    """kernels.linear: x [M, K], or [M·G, K] with G = N / group_rows groups → [M, N]."""
    n, k = cw.shape
    group_rows = group_rows or n
    out = np.empty((x.shape[0] // (n // group_rows), n), np.float32)
    kernels.linear(cw.fmt, cw.codes, cw.scale, n, k, x, group_rows, out)
    return out


def _rel(out, ref):
    return np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("fmt,n,k", [("fp8", 200, 160), ("fp8", 130, 33), ("fp8", 7, 300), ("fp4", 129, 96),
                                     ("fp4", 3, 64), ("float", 77, 95), ("float", 256, 512)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_linear_matches_decomposition(fmt, n, k, m):
    qw = _weights(fmt, n, k)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    ref = x.astype(np.float64) @ quant.dequantize(qw, np.float64).T
    assert _rel(_product(kernel_form(qw), x), ref) <= 2e-6


@pytest.mark.parametrize("fmt,n,k", [("fp8", 200, 160), ("fp8", 130, 33), ("fp4", 129, 96), ("float", 77, 95)])
def test_row_decode_is_exact(fmt, n, k):
    """A tile of consecutive rows and an arbitrary pick (repeats, the last row: an embedding lookup)."""
    qw = _weights(fmt, n, k)
    cw, dense = kernel_form(qw), quant.dequantize(qw, np.float32)
    np.testing.assert_array_equal(cw.rows(np.arange(5, n)), dense[5:])
    pick = np.array([[3, 0], [3, n - 1]])
    np.testing.assert_array_equal(cw.rows(pick), dense[pick])


def test_every_e4m3_code_decodes_exactly():
    """All 256 codes (±0, the 14 subnormals, ±448, NaN at 0x7F/0xFF) at unit, the smallest and the largest
    E8M0 scale, and an all-zero block."""
    codes = np.zeros((128, 384), np.uint8)                                   # 3 column blocks, the last all 0
    codes[:, :256] = np.arange(256, dtype=np.uint8)
    tiles = {}
    for s in (127, 1, 254):
        scale = np.full((1, 3), s, np.uint8)
        qw = quant.QuantWeight("fp8", codes, scale, codes.shape)
        tile = kernel_form(qw).dense()
        with np.errstate(over="ignore"):                         # 448 · 2^127 is inf in float32 either way
            np.testing.assert_array_equal(tile, quant.dequantize(qw, np.float32))
        tiles[s] = tile
    unit = tiles[127][0]
    assert np.isnan(unit[0x7F]) and unit[0x7E] == 448 and unit[0xFE] == -448 and unit[1] == 2.0 ** -9
    assert tiles[1][0, 1] == 2.0 ** -135 and tiles[254][0, 0x38] == 2.0 ** 127


def test_fp8_subnormal_and_extreme_products():
    """A product over subnormal-only codes and over ±448 codes at a large scale equals the float64 one."""
    k = 256
    codes = RNG.choice(np.array([1, 2, 7, 0x81, 0x87, 0x7E, 0xFE], np.uint8), size=(64, k))
    qw = quant.QuantWeight("fp8", codes, np.array([[140, 100]], np.uint8), codes.shape)
    x = RNG.standard_normal((2, k)).astype(np.float32)
    ref = x.astype(np.float64) @ quant.dequantize(qw, np.float64).T
    assert _rel(_product(kernel_form(qw), x), ref) <= 2e-6


def test_every_e2m1_code_decodes_exactly():
    """All 16 nibbles in both halves of a byte (±0, ±0.5 … ±6), at the extreme scales."""
    lo, hi = np.meshgrid(np.arange(16), np.arange(16))
    packed = (lo | (hi << 4)).astype(np.uint8).reshape(8, 32)                 # [8 rows, 64 values]
    for s in (127, 1, 254, 0):
        scale = np.full((8, 2), s, np.uint8)
        qw = quant.QuantWeight("fp4", packed, scale, (8, 64))
        tile = kernel_form(qw).dense()
        with np.errstate(over="ignore"):                         # 6 · 2^127 is inf in float32 either way
            np.testing.assert_array_equal(tile, quant.dequantize(qw, np.float32))
    assert set(np.unique(np.abs(quant.dequantize(quant.QuantWeight("fp4", packed, np.full((8, 2), 127, np.uint8),
                                                                   (8, 64)))))) == {0, .5, 1, 1.5, 2, 3, 4, 6}


def test_grouped_rows_read_their_group():
    """group_rows: output row r reads x row m·G + r // group_rows (wo_a's per-group projection)."""
    groups, per, k = 4, 128, 96
    qw = _weights("fp8", groups * per, k)
    x = RNG.standard_normal((2 * groups, k)).astype(np.float32)
    dense = quant.dequantize(qw, np.float64).reshape(groups, per, k)
    ref = np.einsum("mgk,grk->mgr", x.reshape(2, groups, k).astype(np.float64), dense).reshape(2, -1)
    assert _rel(_product(kernel_form(qw), x, per), ref) <= 2e-6


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_fused_experts_match_per_expert_decomposition(fmt):
    """kernels.moe over only the routed experts (−1 skips) == Σ wts·SwiGLU-expert in float64."""
    from dsv4.backends.cpu.weights import ExpertBank, CpuLinear
    e_count, inter, dim, limit = 6, 64, 96, 4.0
    qws = [[_weights(fmt, *((inter, dim) if p != 1 else (dim, inter))) for p in range(3)] for _ in range(e_count)]
    forms = [[kernel_form(q) for q in row] for row in qws]
    bank = ExpertBank(*[CpuLinear(forms[0][p].fmt, np.stack([f[p].codes for f in forms]),
                                  np.stack([f[p].scale for f in forms]), forms[0][p].shape) for p in range(3)],
                      e_count)
    x = (3 * RNG.standard_normal((3, dim))).astype(np.float32)
    idx = np.array([[0, 5], [2, -1], [5, 3]])
    wts = RNG.random((3, 2)).astype(np.float32)
    out = np.empty_like(x)
    kernels.moe(bank.fmt, bank.w1.codes, bank.w1.scale, bank.w2.codes, bank.w2.scale, bank.w3.codes,
                bank.w3.scale, inter, dim, x, idx, wts, np.float32(limit), False, out)
    ref = np.zeros((3, dim))
    for m in range(3):
        for j in range(2):
            e = idx[m, j]
            if e < 0:
                continue
            w1, w2, w3 = (quant.dequantize(q, np.float64) for q in qws[e])
            g = np.minimum(x[m] @ w1.T, limit)
            u = np.clip(x[m] @ w3.T, -limit, limit)
            ref[m] += (g / (1 + np.exp(-g)) * u * wts[m, j]) @ w2.T
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "float"])
def test_row_absmax_without_densifying(fmt):
    """CpuOps.row_absmax (the head's live rows) == max |dense row|, zero rows included."""
    from dsv4.backends.cpu.ops import CpuOps
    qw = _weights(fmt, 300, 64)
    cw = kernel_form(qw)
    cw.codes.reshape(300, -1)[[7, 299]] = 0
    want = np.abs(quant.dequantize(quant.QuantWeight(qw.fmt, cw.codes.reshape(qw.data.shape), qw.scale, qw.shape),
                                   np.float32)).max(-1)
    got = CpuOps().row_absmax(cw)
    np.testing.assert_array_equal(got, want)
    assert got[7] == got[299] == 0 and (got[:7] > 0).all()


def test_sinkhorn_matches_the_default_decomposition():
    from dsv4.backends.cpu.ops import CpuOps
    from dsv4.portable.reference import NumpyOps
    c = (2 * RNG.standard_normal((2, 3, 4, 4))).astype(np.float32)
    got, want = CpuOps().sinkhorn(c, 20, 1e-6), NumpyOps("float32").sinkhorn(c, 20, 1e-6)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert np.allclose(got.sum(-2), 1, atol=1e-5)                 # columns normalized last


def test_fp4_decode_off_x86_matches_the_table(monkeypatch):
    """The shift formula used where there is no byte shuffle (ARM Linux, say), compiled here by building the
    intrinsics again with the x86 path turned off: every byte's two nibbles decode to E2M1 × scale."""
    from numba import njit
    monkeypatch.setattr(kernels, "_X86", False)
    _, store32 = kernels._make_intrinsics(kernels.FP4)

    @njit
    def decode(codes, out, s):
        for i in range(codes.size // 16):
            store32(codes, i * 16, out, i * 32, s)

    codes = np.arange(256, dtype=np.uint8)
    out = np.empty(512, np.float32)
    decode(codes, out, np.float32(0.25))
    want = np.stack([quant.E2M1[codes & 15], quant.E2M1[codes >> 4]], -1).reshape(-1) * 0.5
    np.testing.assert_array_equal(out, want)

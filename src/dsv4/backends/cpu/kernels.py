"""Matmul kernels that read FP8, FP4 and BF16 weights as stored, decoding them exactly inside the product.

Why hand-written vector code: on a CPU a decode step is bound by reading the weights, so the decode must
cost less than the memory traffic.  A 256-entry table lookup per weight (a gather) runs at ~1.3 GB/s per
core here; LLVM's auto-vectorized bit tricks reach ~3.3 GB/s once FP8 subnormals are handled exactly.
Writing the 32-wide decode directly in LLVM IR (through numba's `intrinsic`, llvmlite builds the IR)
gives ~8.5 GB/s per core for FP8 and ~6.4 GB/s of packed bytes for FP4, about memcpy speed on two cores.

Exact decodes (every code, including ±0, subnormals and NaN, equals `portable.quant`'s table):
* e4m3 byte b = s|eeee|mmm: the fp32 word s<<31 | (b&0x7F)<<20 plus the exponent rebias 120<<23 for
  e > 0; for e = 0 the value m·2⁻⁹ (the int→float of m, times a power of two); 0x7F/0xFF → NaN.
* e2m1 nibble: a byte shuffle (`pshufb`, one instruction for 16 nibbles) from a 16-entry table of 2×value
  (all integers −12…12, exact in int8), then int→float; the ½ is folded into the block scale.  Off x86
  the same values come from shifts (i < 2 ? i : (2 | i&1) << ((i>>1) − 1)).
* bf16: the word shifted into the high half of an fp32.

Each kernel multiplies decoded weights by activations in float32 with float32 accumulators, and applies a
block's E8M0 scale (exact: a power of two) to the block's products.  Rows are split across numba's
threads (`prange`); `numba.set_num_threads` (the backend's `threads`) bounds them.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...portable import quant

LANES = 32                      # weights decoded per intrinsic call
FP8, FP4, BF16 = 0, 1, 2        # format codes the kernels branch on (compile-time constants per call site)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_VI8, _VI16, _VI32 = ir.VectorType(_I8, LANES), ir.VectorType(ir.IntType(16), LANES), ir.VectorType(_I32, LANES)
_VF = ir.VectorType(_F32, LANES)
_HALF8 = ir.VectorType(_I8, LANES // 2)
_E2M1_X2 = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]     # 2 × e2m1 value, by nibble

E4M3 = quant.e4m3_to_f32(np.arange(256, dtype=np.uint8)).astype(np.float32)     # scalar tails


def _splat(vtype, value):
    return ir.Constant(vtype, [value] * vtype.count)


def _load(builder, context, arrty, arr, offset, vtype):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.load(builder.bitcast(builder.gep(data, [offset]), vtype.as_pointer()), align=1)


def _e4m3(builder, codes):
    b = builder.zext(codes, _VI32)
    mag = builder.and_(b, _splat(_VI32, 0x7F))
    sign = builder.shl(builder.and_(b, _splat(_VI32, 0x80)), _splat(_VI32, 24))
    normal = builder.or_(sign, builder.add(builder.shl(mag, _splat(_VI32, 20)), _splat(_VI32, 120 << 23)))
    sub = builder.fmul(builder.uitofp(mag, _VF), _splat(_VF, 2.0 ** -9))
    sub = builder.or_(builder.bitcast(sub, _VI32), sign)
    bits = builder.select(builder.icmp_unsigned("<", mag, _splat(_VI32, 8)), sub, normal)
    bits = builder.select(builder.icmp_unsigned("==", mag, _splat(_VI32, 0x7F)), _splat(_VI32, 0x7FC00000), bits)
    return builder.bitcast(bits, _VF)


def _e2m1_x2_nibbles(builder, nib):
    """16 nibbles (as i8 0..15) → their 2×value as i8."""
    if _X86:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_HALF8, [_HALF8, _HALF8]),
                                            "llvm.x86.ssse3.pshuf.b.128")
        return builder.call(fn, [ir.Constant(_HALF8, [v & 0xFF for v in _E2M1_X2]), nib])
    half = _HALF8
    i = builder.and_(nib, _splat(half, 7))
    hi = builder.shl(builder.or_(_splat(half, 2), builder.and_(i, _splat(half, 1))),
                     builder.sub(builder.lshr(i, _splat(half, 1)), _splat(half, 1)))
    mag = builder.select(builder.icmp_unsigned("<", i, _splat(half, 2)), i, hi)
    neg = builder.icmp_unsigned("!=", builder.and_(nib, _splat(half, 8)), _splat(half, 0))
    return builder.select(neg, builder.sub(_splat(half, 0), mag), mag)


def _e2m1_x2(builder, packed):
    """16 packed bytes (low nibble = even element) → 32 floats of 2×value, in element order."""
    lo = _e2m1_x2_nibbles(builder, builder.and_(packed, _splat(_HALF8, 15)))
    hi = _e2m1_x2_nibbles(builder, builder.lshr(packed, _splat(_HALF8, 4)))
    order = [j for i in range(LANES // 2) for j in (i, LANES // 2 + i)]
    return builder.sitofp(builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, LANES), order)), _VF)


def _bf16(builder, words):
    return builder.bitcast(builder.shl(builder.zext(words, _VI32), _splat(_VI32, 16)), _VF)


def _decoder(fmt):
    if fmt == FP8:
        return _VI8, _e4m3
    if fmt == FP4:
        return _HALF8, _e2m1_x2
    return _VI16, _bf16


def _make_intrinsics(fmt):
    vtype, decode = _decoder(fmt)

    def _splat_f(builder, s):
        v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(_VF, ir.Undefined), ir.Constant(_VI32, [0] * LANES))

    @intrinsic
    def fma32(typingctx, codes, coff, x, xoff, acc, s):
        """acc[0:32] += decode(codes at coff) · x[xoff:xoff+32] · s"""
        sig = types.void(codes, types.intp, x, types.intp, acc, types.float32)

        def codegen(context, builder, signature, args):
            ca, co, xa, xo, aa, sv = args
            w = decode(builder, _load(builder, context, signature.args[0], ca, co, vtype))
            xv = _load(builder, context, signature.args[2], xa, xo, _VF)
            ap = builder.bitcast(context.make_array(signature.args[4])(context, builder, aa).data, _VF.as_pointer())
            prod = builder.fmul(w, builder.fmul(xv, _splat_f(builder, sv)))
            builder.store(builder.fadd(builder.load(ap, align=4), prod), ap, align=4)
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def store32(typingctx, codes, coff, out, ooff, s):
        """out[ooff:ooff+32] = decode(codes at coff) · s"""
        sig = types.void(codes, types.intp, out, types.intp, types.float32)

        def codegen(context, builder, signature, args):
            ca, co, oa, oo, sv = args
            w = decode(builder, _load(builder, context, signature.args[0], ca, co, vtype))
            data = context.make_array(signature.args[2])(context, builder, oa).data
            op = builder.bitcast(builder.gep(data, [oo]), _VF.as_pointer())
            builder.store(builder.fmul(w, _splat_f(builder, sv)), op, align=1)
            return context.get_dummy_value()
        return sig, codegen

    return fma32, store32


@intrinsic
def _vfma32(typingctx, w, x, xoff, acc):
    """acc[0:32] += w[0:32] · x[xoff:xoff+32] (decoded weights reused for another activation row)"""
    sig = types.void(w, x, types.intp, acc)

    def codegen(context, builder, signature, args):
        wa, xa, xo, aa = args
        wv = _load(builder, context, signature.args[0], wa, ir.Constant(ir.IntType(64), 0), _VF)
        xv = _load(builder, context, signature.args[1], xa, xo, _VF)
        ap = builder.bitcast(context.make_array(signature.args[3])(context, builder, aa).data, _VF.as_pointer())
        builder.store(builder.fadd(builder.load(ap, align=4), builder.fmul(wv, xv)), ap, align=4)
        return context.get_dummy_value()
    return sig, codegen


_fp8_fma, _fp8_store = _make_intrinsics(FP8)
_fp4_fma, _fp4_store = _make_intrinsics(FP4)
_bf16_fma, _bf16_store = _make_intrinsics(BF16)


@intrinsic
def _bits_f32(typingctx, bits):
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], _F32)


@intrinsic
def _f32_bits(typingctx, value):
    return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], _I32)


# ------------------------------------------------------------------------------------ per format
@njit(inline="always", fastmath=True)
def _scalar(fmt, codes, i):
    """Element i of a row (tails shorter than 32; FP4 rows are whole blocks, so never FP4)."""
    if fmt == FP8:
        return E4M3[codes[i]]
    return _bits_f32(np.uint32(codes[i]) << np.uint32(16))


@njit(inline="always")
def _scale_row(fmt, scale, row):
    """The scales of weight row `row`: FP8 [ceil(N/128), ceil(K/128)] blocks, FP4 [N, K/32]; BF16 has none
    (a [1, 1] placeholder)."""
    if fmt == FP8:
        return scale[row // quant.FP8_BLOCK]
    return scale[row] if fmt == FP4 else scale[0]


@njit(inline="always")
def _row_elems(fmt, k):
    """Codes per weight row of K inputs (packed FP4: two per byte)."""
    return k // 2 if fmt == FP4 else k


@njit(inline="always")
def _chunk_scale(fmt, scale_row, j):
    """The factor of the 32 weights (or the tail element) at column j: the FP8 block scale, half the FP4
    block scale (the decode yields 2×value), 1 for BF16."""
    if fmt == FP8:
        return scale_row[j // quant.FP8_BLOCK]
    if fmt == FP4:
        return scale_row[j // quant.FP4_BLOCK] * np.float32(0.5)
    return np.float32(1.0)


@njit(inline="always")
def _chunk_code(fmt, off, j):
    """Where the codes of the 32 weights at column j start, for a row starting at code `off`."""
    return off + (j // LANES) * (LANES // 2 if fmt == FP4 else LANES)


@njit(inline="always")
def _fma32(fmt, codes, c, x, xoff, acc, s):
    if fmt == FP8:
        _fp8_fma(codes, c, x, xoff, acc, s)
    elif fmt == FP4:
        _fp4_fma(codes, c, x, xoff, acc, s)
    else:
        _bf16_fma(codes, c, x, xoff, acc, s)


@njit(inline="always")
def _store32(fmt, codes, c, out, ooff, s):
    if fmt == FP8:
        _fp8_store(codes, c, out, ooff, s)
    elif fmt == FP4:
        _fp4_store(codes, c, out, ooff, s)
    else:
        _bf16_store(codes, c, out, ooff, s)


# ------------------------------------------------------------------------------------ one row, many x
@njit(inline="always", fastmath=True)
def _row_dots(fmt, codes, off, k, scale_row, x, xrow, acc, buf, out, orow, col):
    """out[m, col] = Σ_j decode(codes[off + ·])·x[xrow[m], j]·scale for each m; x [*, k] float32.

    One x row: the fused decode-multiply-add.  Several: each 32 weights are decoded once into `buf` and
    multiplied into every row's accumulator (acc [M, 32])."""
    m_rows = xrow.shape[0]
    acc[:] = 0
    full = k - k % LANES
    for j in range(0, full, LANES):
        s = _chunk_scale(fmt, scale_row, j)
        c = _chunk_code(fmt, off, j)
        if m_rows == 1:
            _fma32(fmt, codes, c, x[xrow[0]], j, acc[0], s)
        else:
            _store32(fmt, codes, c, buf, 0, s)
            for m in range(m_rows):
                _vfma32(buf, x[xrow[m]], j, acc[m])
    for m in range(m_rows):
        tot = np.float32(0.0)
        for t in range(LANES):
            tot += acc[m, t]
        xr = x[xrow[m]]
        for j in range(full, k):
            tot += _scalar(fmt, codes, off + j) * _chunk_scale(fmt, scale_row, j) * xr[j]
        out[orow[m], col] = tot


TASKS = 64                      # row ranges per product: balanced over the threads, few allocations


@njit(inline="always")
def _task_rows(n):
    return max(8, (n + TASKS - 1) // TASKS)


@njit(parallel=True, fastmath=True, cache=True)
def linear(fmt, codes, scale, n, k, x, group_rows, out):
    """out [M, N] = x · Wᵀ for a stored weight W [N, K] (codes flat, row-major).  x [M·G, K] float32: output
    row r reads x row m·G + r // group_rows (G = N / group_rows groups; one group: x [M, K])."""
    m_rows = out.shape[0]
    groups = n // group_rows
    rk = _row_elems(fmt, k)
    per = _task_rows(n)
    for task in prange((n + per - 1) // per):
        acc = np.empty((m_rows, LANES), np.float32)
        buf = np.empty(LANES, np.float32)
        xrow = np.empty(m_rows, np.int64)
        orow = np.arange(m_rows)
        for r in range(task * per, min(n, task * per + per)):
            for m in range(m_rows):
                xrow[m] = m * groups + r // group_rows
            _row_dots(fmt, codes, r * rk, k, _scale_row(fmt, scale, r), x, xrow, acc, buf, out, orow, r)


@njit(inline="always", fastmath=True)
def _decode_row(fmt, codes, scale, k, r, orow):
    """orow [K] float32 = row r of the stored weight, exactly."""
    off = r * _row_elems(fmt, k)
    full = k - k % LANES
    srow = _scale_row(fmt, scale, r)
    for j in range(0, full, LANES):
        _store32(fmt, codes, _chunk_code(fmt, off, j), orow, j, _chunk_scale(fmt, srow, j))
    for j in range(full, k):
        orow[j] = _scalar(fmt, codes, off + j) * _chunk_scale(fmt, srow, j)


@njit(parallel=True, fastmath=True, cache=True)
def decode_rows(fmt, codes, scale, k, rows, out):
    """out [R, K] float32 = rows `rows` [R] of the stored weight, exactly (looked-up embedding rows, a
    head's live rows, a dense copy), over numba's threads."""
    for i in prange(out.shape[0]):
        _decode_row(fmt, codes, scale, k, rows[i], out[i])


@njit(nogil=True, fastmath=True, cache=True)
def decode_tile(fmt, codes, scale, k, r0, out):
    """out [R, K] float32 = rows r0 … r0+R−1, on the calling thread without the GIL: prefill's worker
    threads each decode a tile and multiply it (single-threaded BLAS), so both run on every core."""
    for i in range(out.shape[0]):
        _decode_row(fmt, codes, scale, k, r0 + i, out[i])


# ------------------------------------------------------------------------------------ routed experts
@njit(fastmath=True, inline="always")
def _swiglu(g, u, limit, coef):
    g = min(g, limit)
    u = min(max(u, -limit), limit)
    return g / (np.float32(1.0) + np.exp(-g)) * u * coef


@njit(fastmath=True, inline="always")
def _bf16_round(v):
    """Round-to-nearest-even to bf16 (the activation storage of a bfloat16 run), as float32."""
    b = _f32_bits(v)
    return _bits_f32((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))


@njit(inline="always")
def _one_row_scratch():
    return (np.empty((1, LANES), np.float32), np.empty(LANES, np.float32), np.empty((1, 1), np.float32),
            np.empty(1, np.int64), np.zeros(1, np.int64))


@njit(inline="always", fastmath=True)
def _one_row_dot(fmt, codes, off, k, scale_row, x, xr, scratch):
    """Σ_j decode(codes[off + ·])·x[xr, j]·scale: one weight row times one activation row."""
    acc, buf, res, xrow, orow = scratch
    xrow[0] = xr
    _row_dots(fmt, codes, off, k, scale_row, x, xrow, acc, buf, res, orow, 0)
    return res[0, 0]


@njit(parallel=True, fastmath=True, cache=True)
def moe(fmt, c1, s1, c2, s2, c3, s3, inter, dim, x, idx, wts, limit, round_bf16, out):
    """out [M, D] = Σ_k wts[m,k]·Expert_{idx[m,k]}(x[m]) over the routed experts only (idx −1 = skip).

    Banks: c1/c3 [E, I·D] (w1 gate, w3 up: [I, D] per expert), c2 [E, D·I] (w2 down), flat codes per
    expert with their scales [E, …].  Two passes over the threads: every (token, expert, I-row) of the
    gate/up products with the clamped SwiGLU and the routing weight applied before w2 as in the official
    code, then every (token, D-row) of the down products summed over the token's experts."""
    m_rows, k = idx.shape
    pairs = np.empty((m_rows * k, 2), np.int64)
    p = 0
    for m in range(m_rows):
        for j in range(k):
            if idx[m, j] >= 0:
                pairs[p, 0] = m
                pairs[p, 1] = j
                p += 1
    hidden = np.empty((p, inter), np.float32)
    rk1 = _row_elems(fmt, dim)
    per = _task_rows(p * inter)
    for task in prange((p * inter + per - 1) // per):
        scratch = _one_row_scratch()
        for t in range(task * per, min(p * inter, task * per + per)):
            q, r = t // inter, t % inter
            m, j = pairs[q, 0], pairs[q, 1]
            e = idx[m, j]
            g = _one_row_dot(fmt, c1[e], r * rk1, dim, _scale_row(fmt, s1[e], r), x, m, scratch)
            u = _one_row_dot(fmt, c3[e], r * rk1, dim, _scale_row(fmt, s3[e], r), x, m, scratch)
            a = _swiglu(g, u, limit, wts[m, j])
            hidden[q, r] = _bf16_round(a) if round_bf16 else a
    rk2 = _row_elems(fmt, inter)
    per = _task_rows(m_rows * dim)
    for task in prange((m_rows * dim + per - 1) // per):
        scratch = _one_row_scratch()
        for t in range(task * per, min(m_rows * dim, task * per + per)):
            m, d = t // dim, t % dim
            tot = np.float32(0.0)
            for q in range(p):
                if pairs[q, 0] == m:
                    e = idx[m, pairs[q, 1]]
                    tot += _one_row_dot(fmt, c2[e], d * rk2, inter, _scale_row(fmt, s2[e], d), hidden, q, scratch)
            out[m, d] = tot


# ------------------------------------------------------------------------------------ mHC
@njit(fastmath=False, cache=True)
def sinkhorn(c, iters, eps):
    """`Ops.sinkhorn` on c [N, hc, hc] (its default decomposition, in one call instead of ~4·iters NumPy
    reductions: a decode step runs it twice per layer)."""
    out = np.empty_like(c)
    n, h, _ = c.shape
    for i in range(n):
        m = out[i]
        for r in range(h):
            top = c[i, r, 0]
            for j in range(1, h):
                top = max(top, c[i, r, j])
            tot = 0.0
            for j in range(h):
                m[r, j] = np.exp(c[i, r, j] - top)
                tot += m[r, j]
            for j in range(h):
                m[r, j] = m[r, j] / tot + eps
        for t in range(iters):
            if t > 0:
                for r in range(h):
                    tot = 0.0
                    for j in range(h):
                        tot += m[r, j]
                    for j in range(h):
                        m[r, j] /= tot + eps
            for j in range(h):
                tot = 0.0
                for r in range(h):
                    tot += m[r, j]
                for r in range(h):
                    m[r, j] /= tot + eps
    return out

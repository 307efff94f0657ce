"""Triton kernels for V4's hot composites, with torch wrappers that match the `Ops` composite signatures.

Each wrapper returns exactly what the default decomposition in `portable.ops` returns (before the final
`act` rounding, which `TorchOps` applies), so the decomposition is the kernel's reference.  All kernels
compute in float32 and accept float32 or bfloat16 activations/state; `TRITON_INTERPRET=1` runs them on
the CPU (that is how they are tested without a GPU).

* `sink_attention` — one launch per attention segment (window ring, the chunk's own rows, gathered or
  masked entries), one program per (query, block of heads): online softmax over the segment's rows in
  blocks, carried from segment to segment in a running (max, sum, out) that starts from the sink logit
  (m = sink, l = 1), so the sink only enlarges the denominator and nothing visible gives exactly 0.
* `indexer_topk` — one launch per key segment, one program per query: streams the causally visible keys
  in blocks, scores them (Σ_h w_h·ReLU(q_h·k), float32 dots) and keeps a running top-k as packed (score,
  row) integers merged with `tl.topk`; blocks that cannot beat the current k-th best skip the merge.  An
  integer top-k over the segments' candidates gives the order of the op path's stable sort over the
  concatenated segments (score descending, earlier row first on ties), −1 padded.
* `hc_pre` / `hc_post` — mHC collapse (RMS, mixing projection, sigmoids, Sinkhorn on the hc×hc matrix
  in registers, weighted sum of streams) and expand, one program per token (per D-block for expand).
* `moe` — routed (token, expert) pairs sorted by expert and padded per expert to the row tile; a fused
  gate/up GEMM + clamped SwiGLU + routing weight, then the down GEMM; FP4 (e2m1 + per-32 scale) and FP8
  (e4m3 + 128×128 scale) weights are decoded from their bytes inside the GEMM loop.  Every size is an
  upper bound computed on the host from shapes only, so the launch is CUDA-graph capturable.
* `fp8_linear` — y = x·Wᵀ with e4m3 bytes and block scales decoded in the K loop.

GEMM precision: float32 runs use `input_precision="ieee"` (exact fp32 products); with `bf16_dot=True`
operands go to the tensor cores as bf16 (exact for e4m3/e2m1 weights and bf16-rounded activations).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...portable import quant


# The interpreter pays per op, not per element: bigger tiles there keep CPU tests fast (same code paths).
_TILE = 128 if os.environ.get("TRITON_INTERPRET") == "1" else 64


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialized output buffer (one place, so tests can poison every output before a kernel runs)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


# ====================================================================== shared device helpers
@triton.jit
def _mm(a, b, BF16: tl.constexpr):
    if BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _e4m3(b):
    """e4m3fn byte (as int32) → float32 (0x7F/0xFF never occur in weights: NaN codes)."""
    s = tl.where((b & 0x80) != 0, -1.0, 1.0)
    e = (b >> 3) & 0xF
    m = (b & 0x7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (1.0 + m * 0.125) * tl.exp2((e - 7).to(tl.float32)))
    return s * mag


@triton.jit
def _e2m1(n):
    """e2m1 nibble (int32 0..15) → float32."""
    s = tl.where((n & 0x8) != 0, -1.0, 1.0)
    e = (n >> 1) & 0x3
    m = (n & 0x1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2((e - 1).to(tl.float32)))
    return s * mag


@triton.jit
def _wtile(w_ptr, s_ptr, rows, cols, N, K, FP4: tl.constexpr):
    """Dequantized weight tile W[rows, cols] (float32, zeros out of range) of a [N, K] weight.

    FP4: bytes [N, K/2], low nibble = even column, scale [N, K/32].  FP8: bytes [N, K], scale [⌈N/128⌉, ⌈K/128⌉]."""
    ok = (rows[:, None] < N) & (cols[None, :] < K)
    if FP4:
        b = tl.load(w_ptr + rows[:, None] * (K // 2) + cols[None, :] // 2, mask=ok, other=0).to(tl.int32)
        nib = (b >> ((cols[None, :] % 2) * 4)) & 0xF
        s = tl.load(s_ptr + rows[:, None] * (K // 32) + cols[None, :] // 32, mask=ok, other=0.0)
        return _e2m1(nib) * s
    b = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0).to(tl.int32)
    s = tl.load(s_ptr + (rows[:, None] // 128) * ((K + 127) // 128) + cols[None, :] // 128, mask=ok, other=0.0)
    return _e4m3(b) * s


def _bytes(w) -> torch.Tensor:
    return w.data.view(torch.uint8) if w.data.dtype == torch.float8_e4m3fn else w.data


# ====================================================================== FP8 block-scaled linear
@triton.jit
def _qlinear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                    FP4: tl.constexpr, BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        w = _wtile(w_ptr, s_ptr, rn, rk, N, K, FP4)
        acc += _mm(x, tl.trans(w), BF16)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def qlinear(x: torch.Tensor, w, bf16_dot: bool = False) -> torch.Tensor:
    """x [..., K] @ Wᵀ for a quantized (fp8 or fp4) weight W [N, K]; float32 out [..., N]."""
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = _alloc((m, n), torch.float32, x.device)
    bm = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, _TILE))
    _qlinear_kernel[grid](x2, _bytes(w), w.scale, y, m, n, k, FP4=w.fmt == "fp4", BF16=bf16_dot,
                          BM=bm, BN=_TILE, BK=_TILE)
    return y.reshape(*lead, n)


def fp8_linear(x, w, bf16_dot: bool = False):
    return qlinear(x, w, bf16_dot)


# ====================================================================== sink attention
@triton.jit
def _sink_attn_kernel(q_ptr, kv_ptr, sel_ptr, m_ptr, l_ptr, acc_ptr, S, H, N, K, D, scale,
                      GATHER: tl.constexpr, PER_QUERY: tl.constexpr,
                      BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BF16: tl.constexpr):
    """Fold one segment's K candidate rows into the running online-softmax state (m, l, acc) of each
    (query, block of heads).  GATHER: row = idx[query, k] (−1 = skip) of kv [B,N,d]; else row k with a
    0/1 mask[query, k], of kv [B,N,d] or (PER_QUERY) of the query's own rows [B,S,K,d]."""
    row = tl.program_id(0)                    # b·S + s
    ph = tl.program_id(1)
    b = row // S
    hs = ph * BH + tl.arange(0, BH)
    ds = tl.arange(0, BD)
    hm, dm = hs < H, ds < D
    hd = (row * H + hs[:, None]) * D + ds[None, :]
    q = tl.load(q_ptr + hd, mask=hm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    m_i = tl.load(m_ptr + row * H + hs, mask=hm, other=0.0)
    l_i = tl.load(l_ptr + row * H + hs, mask=hm, other=0.0)
    acc = tl.load(acc_ptr + hd, mask=hm[:, None] & dm[None, :], other=0.0)
    base = row * K if PER_QUERY else b * N
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        if GATHER:
            j = tl.load(sel_ptr + row * K + ks, mask=ks < K, other=-1)
            ok = j >= 0
        else:
            j = ks
            ok = tl.load(sel_ptr + row * K + ks, mask=ks < K, other=0) != 0
        g = tl.load(kv_ptr + (base + tl.where(ok, j, 0))[:, None] * D + ds[None, :],
                    mask=ok[:, None] & dm[None, :], other=0.0).to(tl.float32)          # [BK, BD]
        sc = _mm(q, tl.trans(g), BF16) * scale                                          # [BH, BK]
        sc = tl.where(ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p, g, BF16)
        m_i = m_new
    tl.store(m_ptr + row * H + hs, m_i, mask=hm)
    tl.store(l_ptr + row * H + hs, l_i, mask=hm)
    tl.store(acc_ptr + hd, acc, mask=hm[:, None] & dm[None, :])


def sink_attention(q, segments, sink, scale, bf16_dot: bool = False):
    """q [B,S,H,d] over `portable.ops.Segment`s, sink [H] → float32 [B,S,H,d].

    One launch per segment folds its rows into a running (max, sum, out) per query and head, started
    from the sink (m = sink, l = 1, out = 0: the sink only enlarges the denominator, and nothing visible
    gives exactly 0), so the segments are attended without concatenating them.  Decode and prefill are
    the same kernels."""
    b, s, h, d = q.shape
    m = torch.empty((b, s, h), dtype=torch.float32, device=q.device).copy_(sink.reshape(1, 1, h))   # never a view
    l = torch.ones((b, s, h), dtype=torch.float32, device=q.device)
    acc = torch.zeros((b, s, h, d), dtype=torch.float32, device=q.device)
    bh = _p2(min(h, 64))
    bd = _p2(d)
    bk = 16 if bd >= 512 else 32
    grid = (b * s, triton.cdiv(h, bh))
    qc = q.contiguous()
    for seg in segments:
        gather = seg.idx is not None
        sel = seg.idx if gather else seg.mask
        k = sel.shape[-1]
        if k == 0:
            continue
        sel = torch.broadcast_to(sel, (b, s, k)).contiguous()
        n = seg.kv.shape[-2] if not seg.is_per_query else k
        _sink_attn_kernel[grid](qc, seg.kv.contiguous(), sel if gather else sel.to(torch.int8), m, l, acc,
                                s, h, n, k, d, float(scale), GATHER=gather, PER_QUERY=seg.is_per_query,
                                BH=bh, BK=bk, BD=bd, BF16=bf16_dot)
    return acc / l[..., None]


# ====================================================================== lightning indexer fused with top-k
@triton.jit
def _indexer_topk_kernel(q_ptr, w_ptr, k_ptr, vis_ptr, out_ptr, S, NH, N, C, TOPK, OFF,
                         BH: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
    """One program per query row (b·S + s): stream the visible keys of one segment in blocks of BK, keep
    the best TOPK as packed candidates (−2⁶³ where fewer are visible).

    A candidate is one int64 that sorts like (score descending, index ascending): the high 32 bits are
    the score's order-preserving integer, the low 32 bits 2³¹−1−(OFF + index), OFF = the segment's first
    row in the concatenation of all segments.  So the running top-k is a plain integer top-k (`tl.topk`
    over [best | block]), the order is the op path's stable sort over the concatenated segments, and the
    k-th best is a threshold below which a whole block is skipped without a merge."""
    row = tl.program_id(0)
    b = row // S
    hs = tl.arange(0, BH)
    cs = tl.arange(0, BC)
    q = tl.load(q_ptr + (row * NH + hs[:, None]) * C + cs[None, :], mask=(hs[:, None] < NH) & (cs[None, :] < C),
                other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * NH + hs, mask=hs < NH, other=0.0).to(tl.float32)
    vis = tl.minimum(tl.load(vis_ptr + row), N)
    ar = tl.arange(0, BK)
    rr = tl.arange(0, BK // BS)
    none = (tl.full((), -2147483647, tl.int64) - 1) << 32           # −2⁶³: below every real candidate
    best = tl.zeros((BK,), tl.int64) + none
    for n0 in range(0, vis, BK):
        blk = tl.zeros((BK // BS, BS), tl.int64) + none
        for t in tl.static_range(BK // BS):
            ns = n0 + t * BS + tl.arange(0, BS)
            live = ns < vis
            keys = tl.load(k_ptr + (b * N + ns[:, None]) * C + cs[None, :], mask=live[:, None] & (cs[None, :] < C),
                           other=0.0).to(tl.float32)
            dots = tl.dot(q, tl.trans(keys), input_precision="ieee")                      # [BH, BS]
            score = tl.sum(tl.maximum(dots, 0.0) * w[:, None], 0)
            score = tl.where(score == 0.0, 0.0, score)                                   # −0 ties +0
            bits = score.to(tl.int32, bitcast=True)
            order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)           # signed, monotone
            cand = (order << 32) + (2147483647 - OFF - ns.to(tl.int64))
            cand = tl.where(live, cand, none)
            blk = tl.where(rr[:, None] == t, cand[None, :], blk)
        kth = tl.max(tl.where(ar == TOPK - 1, best, none), 0)                            # k-th best so far
        if tl.max(tl.reshape(blk, (BK,)), 0) > kth:
            best = tl.topk(tl.reshape(tl.join(best, tl.reshape(blk, (BK,))), (2 * BK,)), BK)
    tl.store(out_ptr + row * TOPK + ar, best, mask=ar < TOPK)


_NONE = -(1 << 63)          # the kernel's "no candidate"


def indexer_topk(qi, w, segments, k):
    """Lightning-indexer top-k over key segments [(keys [B,N,c], count [B,S])]: score_j = Σ_h w_h·ReLU(qi_h·key_j)
    over the rows j < count of each (float32 dots); the k best rows of the concatenated segments by score
    descending, earlier row first on ties (the op path's stable sort).  Returns one [B,S,k] int64 index
    array per segment (its own picks, −1 elsewhere and where fewer than k rows are visible), k clipped to
    the total rows as on the op path.

    Each segment's launch keeps its own top k as packed candidates that carry the row's place in the
    concatenation; one integer top-k over all of them is then exactly the top k of the concatenation."""
    b, s, nh, c = qi.shape
    sizes = [keys.shape[1] for keys, _ in segments]
    k = min(k, sum(sizes))
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    q, wc = qi.contiguous(), w.contiguous()
    parts = []
    for (keys, count), n, off in zip(segments, sizes, offs):
        if n == 0 or k == 0:
            continue
        out = _alloc((b, s, k), torch.int64, qi.device)
        bk = _p2(k)
        _indexer_topk_kernel[(b * s,)](q, wc, keys.contiguous(), torch.broadcast_to(count, (b, s)).contiguous(),
                                       out, s, nh, n, c, k, off, BH=_p2(nh), BC=_p2(c), BS=min(bk, _TILE), BK=bk)
        parts.append(out)
    if not parts:
        best = torch.full((b, s, k), _NONE, dtype=torch.int64, device=qi.device)
    elif len(parts) == 1:
        best = parts[0]
    else:
        best = torch.topk(torch.cat(parts, -1), k, dim=-1).values      # real candidates are distinct: exact order
    row = torch.where(best == _NONE, -1, 2147483647 - (best & 0xFFFFFFFF))     # place in the concatenation
    return [torch.where((row >= off) & (row < off + n), row - off, -1) for n, off in zip(sizes, offs)]


# ====================================================================== mHC
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _hc_pre_kernel(h_ptr, fn_ptr, base_ptr, scale_ptr, x_ptr, post_ptr, comb_ptr, HC, D, iters, hc_eps, norm_eps,
                   HP: tl.constexpr, BLK: tl.constexpr):
    t = tl.program_id(0)
    L = HC * D
    r = tl.arange(0, HP)
    c = tl.arange(0, HP)
    rm = r < HC
    cm2 = rm[:, None] & (c[None, :] < HC)
    acc_pre = tl.zeros((HP,), tl.float32)
    acc_post = tl.zeros((HP,), tl.float32)
    acc_comb = tl.zeros((HP, HP), tl.float32)
    ssq = tl.zeros((), tl.float32)
    for v0 in range(0, L, BLK):
        vs = v0 + tl.arange(0, BLK)
        vm = vs < L
        v = tl.load(h_ptr + t * L + vs, mask=vm, other=0.0).to(tl.float32)
        ssq += tl.sum(v * v, 0)
        f_pre = tl.load(fn_ptr + r[:, None] * L + vs[None, :], mask=rm[:, None] & vm[None, :], other=0.0)
        f_post = tl.load(fn_ptr + (HC + r[:, None]) * L + vs[None, :], mask=rm[:, None] & vm[None, :], other=0.0)
        acc_pre += tl.sum(f_pre * v[None, :], 1)
        acc_post += tl.sum(f_post * v[None, :], 1)
        fr = 2 * HC + r[:, None, None] * HC + c[None, :, None]
        f_c = tl.load(fn_ptr + fr * L + vs[None, None, :], mask=cm2[:, :, None] & vm[None, None, :], other=0.0)
        acc_comb += tl.sum(f_c * v[None, None, :], 2)
    rho = 1.0 / tl.sqrt(ssq / L + norm_eps)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    pre = _sigmoid(acc_pre * rho * s0 + tl.load(base_ptr + r, mask=rm, other=0.0)) + hc_eps
    post = 2.0 * _sigmoid(acc_post * rho * s1 + tl.load(base_ptr + HC + r, mask=rm, other=0.0))
    cb = tl.load(base_ptr + 2 * HC + r[:, None] * HC + c[None, :], mask=cm2, other=0.0)
    logit = tl.where(cm2, acc_comb * rho * s2 + cb, float("-inf"))
    # Sinkhorn: row softmax + eps, column normalize, then (iters − 1) row/column rounds
    e = tl.exp(logit - tl.where(rm, tl.max(logit, 1), 0.0)[:, None])      # padded rows: exp(−inf) = 0
    e = tl.where(cm2, e, 0.0)
    m = tl.where(cm2, e / tl.where(rm, tl.sum(e, 1), 1.0)[:, None] + hc_eps, 0.0)
    m = m / (tl.sum(m, 0)[None, :] + hc_eps)
    for _ in range(iters - 1):
        m = m / (tl.sum(m, 1)[:, None] + hc_eps)
        m = m / (tl.sum(m, 0)[None, :] + hc_eps)
    tl.store(post_ptr + t * HC + r, post, mask=rm)
    tl.store(comb_ptr + t * HC * HC + r[:, None] * HC + c[None, :], m, mask=cm2)
    for d0 in range(0, D, BLK):
        ds = d0 + tl.arange(0, BLK)
        hv = tl.load(h_ptr + t * L + r[:, None] * D + ds[None, :], mask=rm[:, None] & (ds[None, :] < D),
                     other=0.0).to(tl.float32)
        tl.store(x_ptr + t * D + ds, tl.sum(pre[:, None] * hv, 0), mask=ds < D)


def hc_pre(h, fn, base, scale, iters, hc_eps, norm_eps):
    """mHC collapse: h [B,S,hc,D] → (x [B,S,D], post [B,S,hc], comb [B,S,hc,hc]), all float32."""
    b, s, hc, d = h.shape
    t = b * s
    x = _alloc((b, s, d), torch.float32, h.device)
    post = _alloc((b, s, hc), torch.float32, h.device)
    comb = _alloc((b, s, hc, hc), torch.float32, h.device)
    f32 = dict(dtype=torch.float32)
    _hc_pre_kernel[(t,)](h.contiguous(), fn.contiguous().to(**f32), base.contiguous().to(**f32),
                         scale.contiguous().to(**f32), x, post, comb, hc, d, int(iters), float(hc_eps),
                         float(norm_eps), HP=_p2(hc, 2), BLK=256)
    return x, post, comb


@triton.jit
def _hc_post_kernel(f_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, HC, D, HP: tl.constexpr, BLK: tl.constexpr):
    t = tl.program_id(0)
    pd = tl.program_id(1)
    j = tl.arange(0, HP)
    ds = pd * BLK + tl.arange(0, BLK)
    jm, dm = j < HC, ds < D
    f = tl.load(f_ptr + t * D + ds, mask=dm, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * HC + j, mask=jm, other=0.0)
    comb = tl.load(comb_ptr + t * HC * HC + j[:, None] * HC + j[None, :], mask=jm[:, None] & jm[None, :],
                   other=0.0)                                                   # comb[j, k]
    res = tl.load(res_ptr + t * HC * D + j[:, None] * D + ds[None, :], mask=jm[:, None] & dm[None, :],
                  other=0.0).to(tl.float32)                                     # res[j, d]
    mixed = tl.sum(comb[:, :, None] * res[:, None, :], 0)                       # Σ_j comb[j,k]·res[j] → [k, d]
    out = post[:, None] * f[None, :] + mixed
    tl.store(out_ptr + t * HC * D + j[:, None] * D + ds[None, :], out, mask=jm[:, None] & dm[None, :])


def hc_post(f, res, post, comb):
    """mHC expand: out[k] = post_k·f + Σ_j comb[j,k]·res[j]; float32 [B,S,hc,D]."""
    b, s, hc, d = res.shape
    out = _alloc((b, s, hc, d), torch.float32, res.device)
    blk = 256
    _hc_post_kernel[(b * s, triton.cdiv(d, blk))](f.contiguous(), res.contiguous(), post.contiguous().float(),
                                                 comb.contiguous().float(), out, hc, d, HP=_p2(hc, 2), BLK=blk)
    return out


# ====================================================================== MoE (grouped by expert)
def route_tiles(idx: torch.Tensor, n_experts: int, bm: int):
    """Sort (token, slot) pairs by expert and pad each expert's group to a multiple of `bm` rows.

    Returns (rows [R] pair id or −1, tile_expert [T] expert or −1) with R = T·bm an upper bound that
    depends only on shapes (pairs + E·(bm−1)), so no host synchronization is needed."""
    p = idx.numel()
    flat = idx.reshape(-1)
    dev = idx.device
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    order = torch.sort(flat, stable=True)[1]
    e_sorted = flat[order]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(p, device=dev) - first[e_sorted]
    n_tiles = triton.cdiv(p + n_experts * (bm - 1), bm)
    rows = torch.full((n_tiles * bm,), -1, dtype=torch.int64, device=dev)
    rows.scatter_(0, pad_start[e_sorted] + rank, order)
    tile_start = torch.arange(n_tiles, device=dev) * bm
    te = torch.searchsorted(pad_end, tile_start, right=True)
    tile_expert = torch.where(te < n_experts, te, -1)
    return rows, tile_expert


@triton.jit
def _moe_up_kernel(x_ptr, rows_ptr, te_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, wts_ptr, a_ptr, TOPK, I, D,
                   w_stride, s_stride, limit,
                   FP4: tl.constexpr, BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pt, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(te_ptr + pt)
    if e >= 0:
        ri = pt * BM + tl.arange(0, BM)
        pair = tl.load(rows_ptr + ri)
        live = pair >= 0
        tok = tl.where(live, pair // TOPK, 0)
        rn = pn * BN + tl.arange(0, BN)
        g = tl.zeros((BM, BN), tl.float32)
        u = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + tok[:, None] * D + rk[None, :], mask=live[:, None] & (rk[None, :] < D),
                        other=0.0).to(tl.float32)
            w1 = _wtile(w1_ptr + e * w_stride, s1_ptr + e * s_stride, rn, rk, I, D, FP4)
            w3 = _wtile(w3_ptr + e * w_stride, s3_ptr + e * s_stride, rn, rk, I, D, FP4)
            g += _mm(x, tl.trans(w1), BF16)
            u += _mm(x, tl.trans(w3), BF16)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        coef = tl.load(wts_ptr + tl.where(live, pair, 0), mask=live, other=0.0).to(tl.float32)
        a = g * _sigmoid(g) * u * coef[:, None]
        tl.store(a_ptr + ri[:, None] * I + rn[None, :], a, mask=live[:, None] & (rn[None, :] < I))


@triton.jit
def _moe_down_kernel(a_ptr, rows_ptr, te_ptr, w2_ptr, s2_ptr, y_ptr, D, I, w_stride, s_stride,
                     FP4: tl.constexpr, BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pt, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(te_ptr + pt)
    if e >= 0:
        ri = pt * BM + tl.arange(0, BM)
        pair = tl.load(rows_ptr + ri)
        live = pair >= 0
        rn = pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, I, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + ri[:, None] * I + rk[None, :], mask=live[:, None] & (rk[None, :] < I), other=0.0)
            w2 = _wtile(w2_ptr + e * w_stride, s2_ptr + e * s_stride, rn, rk, D, I, FP4)
            acc += _mm(a, tl.trans(w2), BF16)
        tl.store(y_ptr + tl.where(live, pair, 0)[:, None] * D + rn[None, :], acc,
                 mask=live[:, None] & (rn[None, :] < D))


def moe(x, idx, wts, bank, limit, between=None, bf16_dot: bool = False, bm: int = 16):
    """Σ_k wts[:,k]·Expert_{idx[:,k]}(x) for x [N,D], idx/wts [N,k] over an `ExpertBank`; float32 [N,D].

    `between` (optional) is applied to the SwiGLU activations before the down projection (the `act`
    rounding and, with emulation, the activation FP8 rounding of the decomposition)."""
    n, d = x.shape
    topk = idx.shape[1]
    inter = bank.w1.shape[0]
    fp4 = bank.w1.fmt == "fp4"
    rows, tile_expert = route_tiles(idx, len(bank), bm)
    a = _alloc((rows.numel(), inter), torch.float32, x.device)   # dead (padding) rows are never read
    bn, bk = _TILE, _TILE
    w1, w3, w2 = _bytes(bank.w1), _bytes(bank.w3), _bytes(bank.w2)
    _moe_up_kernel[(tile_expert.numel(), triton.cdiv(inter, bn))](
        x.contiguous(), rows, tile_expert, w1, bank.w1.scale, w3, bank.w3.scale, wts.contiguous().float(), a,
        topk, inter, d, w1[0].numel(), bank.w1.scale[0].numel(), float(limit),
        FP4=fp4, BF16=bf16_dot, BM=bm, BN=bn, BK=bk)
    if between is not None:
        a = between(a)
    y = _alloc((n * topk, d), torch.float32, x.device)
    _moe_down_kernel[(tile_expert.numel(), triton.cdiv(d, bn))](
        a, rows, tile_expert, w2, bank.w2.scale, y, d, inter, w2[0].numel(), bank.w2.scale[0].numel(),
        FP4=fp4, BF16=bf16_dot, BM=bm, BN=bn, BK=bk)
    return y.reshape(n, topk, d).sum(1)


assert quant.FP8_BLOCK == 128 and quant.FP4_BLOCK == 32, "kernels hard-code the checkpoint block sizes"

"""Brute-force float64 NumPy DeepSeek-V4 forward: an independent cross-check for the optimized graph.

Written straight from the model spec (docs/model-spec.md §2, §3, §4, §6, §7, §11, §12), on purpose
without looking at the project's graph/ops/reference code.  Everything is deliberately naive:

* float64 throughout, no QAT emulation (no FP8/FP4 rounding, no Hadamard rotation);
* no caches and no state: for every query position ``i`` of every attention layer, every compressed entry
  the query may see is pooled again from scratch, directly from the layer-input rows of its tokens;
* every rule is written out literally (visibility ``j < floor((i+1)/m)``, window ``max(0, i-W+1) .. i``,
  indexer top-k with ties broken toward the lower entry index, sink logit only in the denominator, ...).

Public API::

    bruteforce_logits(cfg, W, ids)                 -> [T, vocab] float64
    bruteforce_mtp_logits(cfg, W, ids, ids_next)   -> [T, vocab] float64   (spec §7)
    random_weights(cfg, seed)                      -> dict name -> float64 array (tid2eid int64)

``W`` maps official checkpoint tensor names (spec §8.3) to float64 arrays (already dequantized, no ``.scale``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bruteforce_logits", "bruteforce_mtp_logits", "bruteforce_main_streams", "random_weights"]


# ============================================================================ small helpers
def _f64(a):
    return np.asarray(a, dtype=np.float64)


def rms_norm(x, w, eps):
    """RMSNorm over the last axis with weight w (spec §2.5)."""
    x = _f64(x)
    return _f64(w) * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rms_only(x, eps):
    """Weightless RMS normalization over the last axis."""
    x = _f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def sigmoid(z):
    z = _f64(z)
    return 1.0 / (1.0 + np.exp(-z))


def softplus(z):
    z = _f64(z)
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def silu(z):
    return z * sigmoid(z)


def stable_topk_desc(scores, k):
    """Indices of the k largest scores; ties broken toward the LOWER index (stable descending sort)."""
    scores = _f64(scores)
    order = sorted(range(len(scores)), key=lambda s: (-scores[s], s))
    return order[:k]


# ============================================================================ RoPE (spec §3.2)
def rope_inv_freq(cfg, ratio):
    """Per-layer inverse frequencies of the rope_dim/2 interleaved pairs.

    ratio == 0: plain RoPE, base rope_theta.  ratio > 0: base compress_rope_theta with the YaRN blend.
    """
    r = cfg.qk_rope_head_dim
    if ratio == 0:
        base = float(cfg.rope_theta)
        return np.array([base ** (-(2.0 * p) / r) for p in range(r // 2)], dtype=np.float64)
    base = float(cfg.compress_rope_theta)
    inv = np.array([base ** (-(2.0 * p) / r) for p in range(r // 2)], dtype=np.float64)
    y = cfg.yarn
    if not y:
        return inv
    factor = float(y.get("factor", 1.0))
    orig = float(y.get("original_max_position_embeddings", cfg.max_position_embeddings))
    beta_fast = float(y.get("beta_fast", 32))
    beta_slow = float(y.get("beta_slow", 1))

    def corr(n_rot):
        return r * math.log(orig / (n_rot * 2.0 * math.pi)) / (2.0 * math.log(base))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), r - 1)
    if low == high:
        high += 0.001
    out = np.empty_like(inv)
    for p in range(r // 2):
        ramp = min(max((p - low) / (high - low), 0.0), 1.0)
        smooth = 1.0 - ramp
        out[p] = inv[p] / factor * (1.0 - smooth) + inv[p] * smooth
    return out


def rope_last(v, pos, inv_freq):
    """Rotate the LAST 2*len(inv_freq) dims of vector(s) v (interleaved pairs) by angle pos*inv_freq.

    v: [..., n]; pos: scalar (use -pos for the inverse rotation).  Returns a new array.
    """
    v = _f64(v).copy()
    r = 2 * len(inv_freq)
    n = v.shape[-1]
    ang = pos * _f64(inv_freq)                      # [r/2], one angle per pair p
    c, s = np.cos(ang), np.sin(ang)
    x0 = v[..., n - r + 0::2].copy()                # dims n-r+2p
    x1 = v[..., n - r + 1::2].copy()                # dims n-r+2p+1
    v[..., n - r + 0::2] = x0 * c - x1 * s
    v[..., n - r + 1::2] = x0 * s + x1 * c
    return v


# ============================================================================ mHC (spec §2.3, §2.4)
def hc_coeffs(cfg, h_tok, fn, base, scale):
    """Per token: h_tok [hc, D] -> (pre [hc], post [hc], comb [hc, hc])."""
    hc = cfg.hc_mult
    v = _f64(h_tok).reshape(-1)                       # stream-major flatten
    rho = 1.0 / math.sqrt(float(np.mean(v * v)) + cfg.rms_norm_eps)
    mix = rho * (_f64(fn) @ v)
    base = _f64(base)
    scale = _f64(scale)
    a, b, c = mix[:hc], mix[hc:2 * hc], mix[2 * hc:]
    ba, bb, bc = base[:hc], base[hc:2 * hc], base[2 * hc:]
    pre = sigmoid(a * scale[0] + ba) + cfg.hc_eps
    post = 2.0 * sigmoid(b * scale[1] + bb)
    C = (c * scale[2] + bc).reshape(hc, hc)           # C[j, k] = entry 2hc + hc*j + k
    eps = cfg.hc_eps
    # row softmax (over k) + eps
    M = np.exp(C - C.max(axis=1, keepdims=True))
    M = M / M.sum(axis=1, keepdims=True) + eps
    M = M / (M.sum(axis=0, keepdims=True) + eps)      # column normalize
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        M = M / (M.sum(axis=1, keepdims=True) + eps)  # rows
        M = M / (M.sum(axis=0, keepdims=True) + eps)  # columns
    return pre, post, M


def hc_collapse(pre, h_tok):
    return sum(pre[k] * h_tok[k] for k in range(len(pre)))


def hc_expand(f, res_tok, post, comb):
    """h_new[k] = post_k * f + sum_j comb[j, k] * res[j]   (comb applied transposed)."""
    hc = len(post)
    out = np.zeros_like(_f64(res_tok))
    for k in range(hc):
        acc = post[k] * f
        for j in range(hc):
            acc = acc + comb[j, k] * res_tok[j]
        out[k] = acc
    return out


def hyper_head(cfg, h, fn, base, scale):
    """h [T, hc, D] -> y [T, D] (spec §2.4)."""
    T = h.shape[0]
    out = np.zeros((T, h.shape[2]))
    for t in range(T):
        v = h[t].reshape(-1)
        rho = 1.0 / math.sqrt(float(np.mean(v * v)) + cfg.rms_norm_eps)
        m = rho * (_f64(fn) @ v)
        w = sigmoid(m * _f64(scale)[0] + _f64(base)) + cfg.hc_eps
        out[t] = sum(w[k] * h[t, k] for k in range(cfg.hc_mult))
    return out


# ============================================================================ compressor (spec §4.1)
def pool_entry(cfg, x, j, m, c, wkv, wgate, ape, norm_w, inv_freq):
    """Pool compressed entry j of a compressor of ratio m and width c, from scratch, from the layer-input
    rows x [T, D] of its tokens; then RMSNorm and RoPE at position j*m.  Returns [c]."""
    wkv, wgate, ape = _f64(wkv), _f64(wgate), _f64(ape)
    kv_slots, gate_slots = [], []
    if m == 4:  # overlap mode, coff = 2
        # slots 0..3: A-halves [:c] of the previous block's tokens (empty for j == 0)
        for q in range(m):
            t = m * (j - 1) + q
            if j == 0:
                kv_slots.append(np.zeros(c))
                gate_slots.append(np.full(c, -np.inf))
            else:
                kv_slots.append((wkv @ x[t])[:c])
                gate_slots.append((wgate @ x[t])[:c] + ape[t % m][:c])
        # slots 4..7: B-halves [c:2c] of the own block's tokens
        for q in range(m):
            t = m * j + q
            kv_slots.append((wkv @ x[t])[c:2 * c])
            gate_slots.append((wgate @ x[t])[c:2 * c] + ape[t % m][c:2 * c])
    else:       # non-overlap
        for q in range(m):
            t = m * j + q
            kv_slots.append(wkv @ x[t])
            gate_slots.append(wgate @ x[t] + ape[t % m])
    KV = np.stack(kv_slots)           # [slots, c]
    G = np.stack(gate_slots)          # [slots, c]
    # softmax over the slots (axis 0), independently for every channel
    P = np.exp(G - G.max(axis=0, keepdims=True))
    P = P / P.sum(axis=0, keepdims=True)
    e = (P * KV).sum(axis=0)
    e = rms_norm(e, norm_w, cfg.rms_norm_eps)
    return rope_last(e, j * m, inv_freq)


# ============================================================================ attention (spec §3, §4)
def attention(cfg, W, pre, ratio, x):
    """One attention sub-layer. x [T, D] = attn-normed collapsed stream.  Returns [T, D]."""
    T, D = x.shape
    H, d = cfg.num_attention_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    inv = rope_inv_freq(cfg, ratio)
    g = lambda name: _f64(W[pre + name])  # noqa: E731

    # §3.1 projections, per token
    qr = np.stack([rms_norm(g("attn.wq_a.weight") @ x[t], g("attn.q_norm.weight"), eps) for t in range(T)])
    q = np.zeros((T, H, d))
    kv = np.zeros((T, d))
    for t in range(T):
        qt = (g("attn.wq_b.weight") @ qr[t]).reshape(H, d)
        qt = rms_only(qt, eps)
        q[t] = rope_last(qt, t, inv)
        kvt = rms_norm(g("attn.wkv.weight") @ x[t], g("attn.kv_norm.weight"), eps)
        kv[t] = rope_last(kvt, t, inv)

    sink = g("attn.attn_sink")
    win = cfg.sliding_window
    G_, hpg, olr = cfg.o_groups, cfg.heads_per_group, cfg.o_lora_rank
    wo_a = g("attn.wo_a.weight")
    wo_b = g("attn.wo_b.weight")
    out = np.zeros((T, D))

    for i in range(T):
        # window keys: positions max(0, i-win+1) .. i  (includes the query)
        keys = [kv[p] for p in range(max(0, i - win + 1), i + 1)]
        if ratio > 0:
            m = ratio
            n_vis = (i + 1) // m
            if m == 4:
                # Lightning indexer over the visible entries (indexer keys pooled from scratch)
                ic = cfg.index_head_dim
                nI = cfg.index_n_heads
                qI = (g("attn.indexer.wq_b.weight") @ qr[i]).reshape(nI, ic)
                qI = rope_last(qI, i, inv)
                wI = (g("attn.indexer.weights_proj.weight") @ x[i]) * (ic ** -0.5) * (nI ** -0.5)
                scores = []
                for s in range(n_vis):
                    Ks = pool_entry(cfg, x, s, m, ic, g("attn.indexer.compressor.wkv.weight"),
                                    g("attn.indexer.compressor.wgate.weight"), g("attn.indexer.compressor.ape"),
                                    g("attn.indexer.compressor.norm.weight"), inv)
                    scores.append(sum(wI[h] * max(float(qI[h] @ Ks), 0.0) for h in range(nI)))
                k = min(cfg.index_topk, n_vis)
                sel = stable_topk_desc(np.array(scores), k)
            else:
                sel = list(range(n_vis))
            for j in sel:
                keys.append(pool_entry(cfg, x, j, m, d, g("attn.compressor.wkv.weight"),
                                       g("attn.compressor.wgate.weight"), g("attn.compressor.ape"),
                                       g("attn.compressor.norm.weight"), inv))
        K = np.stack(keys)                                   # [n, d]; value = key
        o = np.zeros((H, d))
        for h in range(H):
            s = (K @ q[i, h]) / math.sqrt(d)
            mx = max(float(s.max()), float(sink[h]))         # any shift works; sink only in denominator
            e = np.exp(s - mx)
            den = e.sum() + math.exp(float(sink[h]) - mx)
            o[h] = (e / den) @ K
        o = rope_last(o, -i, inv)                            # inverse RoPE at the query position
        # §3.6 grouped output projection
        u = []
        for gi in range(G_):
            og = o[gi * hpg:(gi + 1) * hpg].reshape(-1)      # heads g*hpg .. (g+1)*hpg-1, concatenated
            u.append(wo_a[gi * olr:(gi + 1) * olr] @ og)
        out[i] = wo_b @ np.concatenate(u)
    return out


# ============================================================================ MoE (spec §6)
def route(cfg, W, pre, hash_layer, x_t, tok_id):
    """Router for one token. Returns (expert ids list, weights array)."""
    s = np.sqrt(softplus(_f64(W[pre + "ffn.gate.weight"]) @ x_t))
    if hash_layer:
        idx = [int(e) for e in np.asarray(W[pre + "ffn.gate.tid2eid"])[int(tok_id)]]
    else:
        biased = s + _f64(W[pre + "ffn.gate.bias"])
        idx = stable_topk_desc(biased, cfg.num_experts_per_tok)
    w = np.array([s[e] for e in idx])
    w = w / w.sum() * cfg.routed_scaling_factor
    return idx, w


def swiglu_expert(cfg, w1, w2, w3, x_t):
    gt = _f64(w1) @ x_t
    up = _f64(w3) @ x_t
    lim = cfg.swiglu_limit
    gt = np.minimum(gt, lim)
    up = np.clip(up, -lim, lim)
    return _f64(w2) @ (silu(gt) * up)


def moe(cfg, W, pre, hash_layer, x, ids):
    T, D = x.shape
    out = np.zeros((T, D))
    for t in range(T):
        idx, w = route(cfg, W, pre, hash_layer, x[t], ids[t])
        y = np.zeros(D)
        for e, we in zip(idx, w):
            ep = f"{pre}ffn.experts.{e}."
            y = y + we * swiglu_expert(cfg, W[ep + "w1.weight"], W[ep + "w2.weight"], W[ep + "w3.weight"], x[t])
        sp = pre + "ffn.shared_experts."
        y = y + swiglu_expert(cfg, W[sp + "w1.weight"], W[sp + "w2.weight"], W[sp + "w3.weight"], x[t])
        out[t] = y
    return out


# ============================================================================ block / model (spec §2)
def block(cfg, W, pre, ratio, hash_layer, h, ids):
    """h [T, hc, D] -> [T, hc, D]."""
    T = h.shape[0]
    eps = cfg.rms_norm_eps
    for sub in ("attn", "ffn"):
        res = h
        xs, posts, combs = [], [], []
        for t in range(T):
            p, po, cb = hc_coeffs(cfg, h[t], W[pre + f"hc_{sub}_fn"], W[pre + f"hc_{sub}_base"],
                                  W[pre + f"hc_{sub}_scale"])
            xs.append(hc_collapse(p, h[t]))
            posts.append(po)
            combs.append(cb)
        x = rms_norm(np.stack(xs), W[pre + f"{sub}_norm.weight"], eps)
        if sub == "attn":
            f = attention(cfg, W, pre, ratio, x)
        else:
            f = moe(cfg, W, pre, hash_layer, x, ids)
        h = np.stack([hc_expand(f[t], res[t], posts[t], combs[t]) for t in range(T)])
    return h


def bruteforce_main_streams(cfg, W, ids):
    """Residual streams after the last main block, before hc_head: [T, hc, D]."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    h0 = _f64(W["embed.weight"])[ids]
    h = np.repeat(h0[:, None, :], cfg.hc_mult, axis=1).copy()
    for L in range(cfg.num_hidden_layers):
        h = block(cfg, W, f"layers.{L}.", cfg.ratio(L), cfg.hash_routed(L), h, ids)
    return h


def bruteforce_logits(cfg, W, ids) -> np.ndarray:
    """Main-model logits at every position: [T, vocab] float64."""
    h = bruteforce_main_streams(cfg, W, ids)
    y = hyper_head(cfg, h, W["hc_head_fn"], W["hc_head_base"], W["hc_head_scale"])
    y = rms_norm(y, W["norm.weight"], cfg.rms_norm_eps)
    return y @ _f64(W["head.weight"]).T


def bruteforce_mtp_logits(cfg, W, ids, ids_next) -> np.ndarray:
    """MTP block (spec §7) on the main model's pre-hc_head streams for ids; ids_next[t] = token t+1.

    Returns [T, vocab] float64 (logits predicting token t+2 at position t)."""
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError("config has no MTP block")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids_next = np.asarray(ids_next, dtype=np.int64).reshape(-1)
    assert ids.shape == ids_next.shape
    eps = cfg.rms_norm_eps
    h_main = bruteforce_main_streams(cfg, W, ids)
    p = "mtp.0."
    e = rms_norm(_f64(W["embed.weight"])[ids_next], W[p + "enorm.weight"], eps)       # [T, D]
    z = rms_norm(h_main, W[p + "hnorm.weight"], eps)                                    # per stream
    x = z @ _f64(W[p + "h_proj.weight"]).T + (e @ _f64(W[p + "e_proj.weight"]).T)[:, None, :]
    L = cfg.num_hidden_layers
    x = block(cfg, W, p, cfg.ratio(L), cfg.hash_routed(L), x, ids_next)
    y = hyper_head(cfg, x, W[p + "hc_head_fn"], W[p + "hc_head_base"], W[p + "hc_head_scale"])
    y = rms_norm(y, W[p + "norm.weight"], eps)
    return y @ _f64(W["head.weight"]).T


# ============================================================================ random weights
def random_weights(cfg, seed=0) -> dict:
    """Random float64 weights under official tensor names (spec §8.3), scaled per spec §11.1:
    linears ~ N(0, fan_in^-1/2), hc_*_fn ~ N(0, 0.02), hc_*_base = 0, hc_*_scale = 1, norms ≈ 1,
    small random ape / gate.bias / attn_sink, tid2eid rows = distinct random experts (int64)."""
    rng = np.random.default_rng(seed)
    D, H, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    hc, E, inter = cfg.hc_mult, cfg.n_routed_experts, cfg.moe_intermediate_size
    V = cfg.vocab_size
    W = {}

    def lin(out_f, in_f):
        return rng.standard_normal((out_f, in_f)) / math.sqrt(in_f)

    def norm_w(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    W["embed.weight"] = rng.standard_normal((V, D))
    W["head.weight"] = lin(V, D)
    W["norm.weight"] = norm_w(D)
    W["hc_head_fn"] = 0.02 * rng.standard_normal((hc, hc * D))
    W["hc_head_base"] = np.zeros(hc)
    W["hc_head_scale"] = np.ones(1)

    def layer(pre, ratio, hash_layer):
        W[pre + "attn_norm.weight"] = norm_w(D)
        W[pre + "ffn_norm.weight"] = norm_w(D)
        for sub in ("attn", "ffn"):
            W[pre + f"hc_{sub}_fn"] = 0.02 * rng.standard_normal(((2 + hc) * hc, hc * D))
            W[pre + f"hc_{sub}_base"] = np.zeros((2 + hc) * hc)
            W[pre + f"hc_{sub}_scale"] = np.ones(3)
        a = pre + "attn."
        W[a + "wq_a.weight"] = lin(cfg.q_lora_rank, D)
        W[a + "q_norm.weight"] = norm_w(cfg.q_lora_rank)
        W[a + "wq_b.weight"] = lin(H * d, cfg.q_lora_rank)
        W[a + "wkv.weight"] = lin(d, D)
        W[a + "kv_norm.weight"] = norm_w(d)
        W[a + "wo_a.weight"] = lin(cfg.o_groups * cfg.o_lora_rank, cfg.heads_per_group * d)
        W[a + "wo_b.weight"] = lin(D, cfg.o_groups * cfg.o_lora_rank)
        W[a + "attn_sink"] = 0.1 * rng.standard_normal(H)
        if ratio > 0:
            coff = 2 if ratio == 4 else 1
            c = a + "compressor."
            W[c + "wkv.weight"] = lin(coff * d, D)
            W[c + "wgate.weight"] = lin(coff * d, D)
            W[c + "ape"] = 0.1 * rng.standard_normal((ratio, coff * d))
            W[c + "norm.weight"] = norm_w(d)
        if ratio == 4:
            ic, nI = cfg.index_head_dim, cfg.index_n_heads
            ix = a + "indexer."
            W[ix + "wq_b.weight"] = lin(nI * ic, cfg.q_lora_rank)
            W[ix + "weights_proj.weight"] = lin(nI, D)
            W[ix + "compressor.wkv.weight"] = lin(2 * ic, D)
            W[ix + "compressor.wgate.weight"] = lin(2 * ic, D)
            W[ix + "compressor.ape"] = 0.1 * rng.standard_normal((4, 2 * ic))
            W[ix + "compressor.norm.weight"] = norm_w(ic)
        f = pre + "ffn."
        W[f + "gate.weight"] = lin(E, D)
        if hash_layer:
            W[f + "gate.tid2eid"] = np.stack(
                [rng.choice(E, size=cfg.num_experts_per_tok, replace=False) for _ in range(V)]).astype(np.int64)
        else:
            W[f + "gate.bias"] = 0.1 * rng.standard_normal(E)
        for e in range(E):
            W[f + f"experts.{e}.w1.weight"] = lin(inter, D)
            W[f + f"experts.{e}.w3.weight"] = lin(inter, D)
            W[f + f"experts.{e}.w2.weight"] = lin(D, inter)
        W[f + "shared_experts.w1.weight"] = lin(inter, D)
        W[f + "shared_experts.w3.weight"] = lin(inter, D)
        W[f + "shared_experts.w2.weight"] = lin(D, inter)

    for L in range(cfg.num_hidden_layers):
        layer(f"layers.{L}.", cfg.ratio(L), cfg.hash_routed(L))
    for j in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{j}."
        L = cfg.num_hidden_layers + j
        layer(p, cfg.ratio(L), cfg.hash_routed(L))
        W[p + "e_proj.weight"] = lin(D, D)
        W[p + "h_proj.weight"] = lin(D, D)
        W[p + "enorm.weight"] = norm_w(D)
        W[p + "hnorm.weight"] = norm_w(D)
        W[p + "norm.weight"] = norm_w(D)
        W[p + "hc_head_fn"] = 0.02 * rng.standard_normal((hc, hc * D))
        W[p + "hc_head_base"] = np.zeros(hc)
        W[p + "hc_head_scale"] = np.ones(1)
    return W

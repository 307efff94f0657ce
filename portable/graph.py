"""The DeepSeek V4 forward pass (and its MTP block), written once against `Ops`.

Functional and traceable: `forward(ops, W, cfg, state, ids) -> (logits, new_state, streams)`.  Shapes are
static given (batch, chunk length, max_len); positions are tensors derived from `state["start"]`; there
is no Python `if` on tensor values, so the same code runs eagerly (NumPy reference), compiled (MLX), under
CUDA graphs (torch) and as an exported ONNX graph.  One call handles any chunk: a whole prompt, a chunk of
it, or one decode token; the causal rules of model spec §4.4 are applied per query, so a prefill query
never sees a compressed entry from its own future, and CSA blocks that straddle two calls pool the
previous block's A-halves carried in the state (§4.5).

`W` is the backend's weight store: `W[name]` gives a tensor by its official checkpoint name (linear
weights as the backend's quantized or dense object), `W.experts(prefix)` the routed experts of one layer.
"""

from __future__ import annotations

import math

from .config import ModelConfig
from .ops import Ops, yarn_inv_freq


class Rope:
    """cos/sin tables for one frequency table at the given positions [B,S] (angles in compute precision)."""

    def __init__(self, o: Ops, inv_freq, pos):
        ang = o.reshape(o.hp(o.to_float(pos)), list(pos.shape) + [1]) * o.hp(o.asarray(inv_freq))
        self.cos, self.sin = o.cos(ang), o.sin(ang)


def rope_tables(o: Ops, cfg: ModelConfig, pos) -> dict:
    """The two frequency tables of V4: plain base-10000 (ratio-0 layers) and base-160000 + YaRN (ratio > 0)."""
    r = cfg.qk_rope_head_dim
    return {False: Rope(o, yarn_inv_freq(r, cfg.rope_theta, None), pos),
            True: Rope(o, yarn_inv_freq(r, cfg.compress_rope_theta, cfg.yarn), pos)}


def _rope(o: Ops, x, t: Rope, inverse=False):
    """Rotate x [B,S,(H,)n] with table t; tables [B,S,r/2] get a head axis when x has one."""
    cos, sin = t.cos, t.sin
    if len(x.shape) == 4:
        b, s, r2 = cos.shape
        cos, sin = o.reshape(cos, [b, s, 1, r2]), o.reshape(sin, [b, s, 1, r2])
    return o.rope(x, cos, -sin if inverse else sin)


# ---------------------------------------------------------------------- compressor (§4.1, §4.5)
def compress(o: Ops, cfg: ModelConfig, W, prefix: str, x, st: dict, keys: tuple, start, pos, m: int, rope_fn):
    """Feed a chunk x [B,S,D] to a compressor; returns the updated (entries, tail_kv, tail_gate).

    `keys` names the state buffers (entries, tail kv, tail gate).  Blocks completing in this chunk are
    pooled from [tail rows | new rows]; the tail is the last P projected rows in position order.
    `rope_fn(e, jpos)` rotates new entries at their block-start positions j·m."""
    ent_key, kv_key, g_key = keys
    b, s, _ = x.shape
    tail_kv, tail_g = st[kv_key], st[g_key]
    p = tail_kv.shape[1]
    coff = 2 if m == 4 else 1
    c = tail_kv.shape[2] // coff
    xh = o.hp(x)
    ckv = o.hp(o.linear(xh, W[prefix + "wkv.weight"]))
    cg = o.hp(o.linear(xh, W[prefix + "wgate.weight"])) + o.take(o.hp(W[prefix + "ape"]), pos % m, 0)
    xs_kv = o.concat([tail_kv, ckv], 1)                     # row r ↔ position start − p + r
    xs_g = o.concat([tail_g, cg], 1)
    nb = (s + m - 1) // m                                   # most blocks one chunk can complete
    jb = o.reshape(start // m, [b, 1]) + o.reshape(o.arange(nb), [1, nb])          # candidate entries [B,nb]
    valid = (jb + 1) * m <= o.reshape(start, [b, 1]) + s
    first = jb * m - o.reshape(start, [b, 1]) + p                                   # row of the block's first token
    rows = o.reshape(first, [b, nb, 1]) + o.reshape(o.arange(m), [1, 1, m])         # [B,nb,m]
    if coff == 2:
        rows = o.concat([rows - m, rows], 2)                                        # previous block, own block
    rows = o.minimum(o.maximum(rows, 0), p + s - 1)
    flat = o.reshape(rows, [b, -1])
    gkv = o.reshape(o.gather_rows(xs_kv, flat), [b, nb, coff * m, coff * c])
    gg = o.reshape(o.gather_rows(xs_g, flat), [b, nb, coff * m, coff * c])
    if coff == 2:                                           # A-halves of the previous block, B-halves of its own
        gkv = o.concat([gkv[:, :, :m, :c], gkv[:, :, m:, c:]], 2)
        gg = o.concat([gg[:, :, :m, :c], gg[:, :, m:, c:]], 2)
    e = o.act(o.compress_pool(gkv, gg))                                              # [B,nb,c]
    e = o.rms_norm(e, W[prefix + "norm.weight"], cfg.rms_norm_eps)
    e = rope_fn(e, jb * m)
    cap = st[ent_key].shape[1] - 1
    dest = o.where(valid, jb, cap)                          # masked writes land in the spare last row
    entries = o.scatter_rows(st[ent_key], dest, e)
    return entries, xs_kv[:, s:], xs_g[:, s:]


# ---------------------------------------------------------------------- attention (§3, §4)
def attention(o: Ops, cfg: ModelConfig, W, layer: int, p: str, x, st: dict, new: dict, key: str,
              start, pos, ropes: dict):
    b, s, _ = x.shape
    h, d, m = cfg.num_attention_heads, cfg.head_dim, cfg.ratio(layer)
    eps = cfg.rms_norm_eps
    t = ropes[m > 0]
    qr = o.rms_norm(o.linear(x, W[p + "wq_a.weight"]), W[p + "q_norm.weight"], eps)
    q = o.head_rms(o.reshape(o.linear(qr, W[p + "wq_b.weight"]), [b, s, h, d]), eps)
    q = _rope(o, q, t)
    kv = o.rms_norm(o.linear(x, W[p + "wkv.weight"]), W[p + "kv_norm.weight"], eps)
    kv = o.kv_round(_rope(o, kv, t), cfg.nope_dim)

    win = st[f"{key}.win"]
    wl = win.shape[1]
    keys = o.concat([win, kv], 1)                            # row r ↔ position start − W + r
    new[f"{key}.win"] = keys[:, s:]
    r = o.reshape(o.arange(s), [1, s, 1]) + 1 + o.reshape(o.arange(wl), [1, 1, wl])   # query s sees rows s+1..s+W
    idx = o.where(o.reshape(start, [b, 1, 1]) - wl + r >= 0, r, -1)
    parts, idxs = [keys], [idx]

    if m:
        # entries are rotated at their block-start positions j·m, not at the chunk's positions
        inv = yarn_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.yarn)

        def rope_at(e, jpos):
            return _rope(o, e, Rope(o, inv, jpos))

        ent, tkv, tg = compress(o, cfg, W, p + "compressor.", x, st,
                                (f"{key}.comp", f"{key}.ckv", f"{key}.cgate"), start, pos, m,
                                lambda e, jpos: o.kv_round(rope_at(e, jpos), cfg.nope_dim))
        new[f"{key}.comp"], new[f"{key}.ckv"], new[f"{key}.cgate"] = ent, tkv, tg
        cap = ent.shape[1] - 1
        visible = (pos + 1) // m                             # [B,S] entries visible to each query
        off = wl + s
        if m == 4:
            ik, ikv, ig = compress(o, cfg, W, p + "indexer.compressor.", x, st,
                                   (f"{key}.ikeys", f"{key}.ikv", f"{key}.igate"), start, pos, m,
                                   lambda e, jpos: o.indexer_round(rope_at(e, jpos)))
            new[f"{key}.ikeys"], new[f"{key}.ikv"], new[f"{key}.igate"] = ik, ikv, ig
            nh, ic = cfg.index_n_heads, cfg.index_head_dim
            qi = o.reshape(o.linear(qr, W[p + "indexer.wq_b.weight"]), [b, s, nh, ic])
            qi = o.indexer_round(_rope(o, qi, t))
            wts = o.linear(x, W[p + "indexer.weights_proj.weight"]) * (ic ** -0.5 * nh ** -0.5)
            sel = o.indexer_topk(qi, wts, ik, visible, min(cfg.index_topk, cap))
            cidx = o.where(sel >= 0, sel + off, -1)
        else:
            j = o.reshape(o.arange(cap), [1, 1, cap])
            cidx = o.where(j < o.reshape(visible, [b, s, 1]), j + off, -1)
        parts.append(ent)
        idxs.append(cidx)

    allkv = o.concat(parts, 1) if len(parts) > 1 else parts[0]
    allidx = o.concat(idxs, 2) if len(idxs) > 1 else idxs[0]
    out = o.sink_attention(q, allkv, allidx, W[p + "attn_sink"], 1.0 / math.sqrt(d))
    out = _rope(o, out, t, inverse=True)
    g = cfg.o_groups
    u = o.grouped_linear(o.reshape(out, [b, s, g, cfg.heads_per_group * d]), W[p + "wo_a.weight"], g)
    return o.linear(o.act(o.reshape(u, [b, s, g * cfg.o_lora_rank])), W[p + "wo_b.weight"])


# ---------------------------------------------------------------------- MoE (§6)
def moe(o: Ops, cfg: ModelConfig, W, layer: int, p: str, x, ids):
    b, s, dim = x.shape
    xf = o.reshape(x, [b * s, dim])
    scores = o.sqrt(o.softplus(o.hp(o.linear(o.hp(xf), o.hp(W[p + "gate.weight"])))))   # [N,E]
    k = cfg.num_experts_per_tok
    if cfg.hash_routed(layer):
        idx = o.take(W[p + "gate.tid2eid"], o.reshape(ids, [b * s]), 0)
    else:
        idx = o.topk(scores + o.hp(W[p + "gate.bias"]), k)
    wts = o.take_along_axis(scores, idx, -1)
    wts = wts / o.sum(wts, -1, keepdims=True) * cfg.routed_scaling_factor
    lim = cfg.swiglu_limit
    y = o.moe(xf, idx, wts, W.experts(p + "experts."), lim)
    shared = o.act(o.expert(xf, W[p + "shared_experts.w1.weight"], W[p + "shared_experts.w2.weight"],
                            W[p + "shared_experts.w3.weight"], lim))
    return o.act(o.reshape(y + o.hp(shared), [b, s, dim]))


# ---------------------------------------------------------------------- block and model
def block(o: Ops, cfg: ModelConfig, W, layer: int, p: str, h, ids, st: dict, new: dict, key: str,
          start, pos, ropes):
    it, he, eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
    x, post, comb = o.hc_pre(h, W[p + "hc_attn_fn"], W[p + "hc_attn_base"], W[p + "hc_attn_scale"], it, he, eps)
    x = o.rms_norm(x, W[p + "attn_norm.weight"], eps)
    f = attention(o, cfg, W, layer, p + "attn.", x, st, new, key, start, pos, ropes)
    h = o.hc_post(f, h, post, comb)
    x, post, comb = o.hc_pre(h, W[p + "hc_ffn_fn"], W[p + "hc_ffn_base"], W[p + "hc_ffn_scale"], it, he, eps)
    x = o.rms_norm(x, W[p + "ffn_norm.weight"], eps)
    return o.hc_post(moe(o, cfg, W, layer, p + "ffn.", x, ids), h, post, comb)


def _head(o: Ops, cfg: ModelConfig, W, p: str, h):
    y = o.hc_head(h, W[p + "hc_head_fn"], W[p + "hc_head_base"], W[p + "hc_head_scale"], cfg.hc_eps,
                  cfg.rms_norm_eps)
    y = o.rms_norm(y, W[p + "norm.weight"], cfg.rms_norm_eps)
    return o.linear(o.hp(y), o.hp(W["head.weight"]))


def _positions(o: Ops, start, s: int):
    b = start.shape[0]
    return o.reshape(start, [b, 1]) + o.reshape(o.arange(s), [1, s])


def forward(o: Ops, W, cfg: ModelConfig, state: dict, ids):
    """Run a chunk of token ids [B,S] from `state`.  Returns (logits [B,S,V] fp32/hp, new state, streams),
    where `streams` [B,S,hc,D] are the residual streams before the HyperHead (the MTP block's input)."""
    b, s = ids.shape
    start = state["start"]
    pos = _positions(o, start, s)
    ropes = rope_tables(o, cfg, pos)
    e = o.act(o.take(W["embed.weight"], ids, 0))                                  # [B,S,D]
    h = o.broadcast_to(o.reshape(e, [b, s, 1, cfg.hidden_size]), [b, s, cfg.hc_mult, cfg.hidden_size])
    new = {"start": start + s}
    for layer in range(cfg.num_hidden_layers):
        h = block(o, cfg, W, layer, f"layers.{layer}.", h, ids, state, new, f"L{layer}", start, pos, ropes)
    return _head(o, cfg, W, "", h), new, h


def mtp_forward(o: Ops, W, cfg: ModelConfig, state: dict, streams, ids_next):
    """The MTP block (§7): main streams at positions i plus token i+1 → logits for token i+2."""
    b, s = ids_next.shape
    start = state["start"]
    pos = _positions(o, start, s)
    ropes = rope_tables(o, cfg, pos)
    eps, dim = cfg.rms_norm_eps, cfg.hidden_size
    p = "mtp.0."
    e = o.rms_norm(o.act(o.take(W["embed.weight"], ids_next, 0)), W[p + "enorm.weight"], eps)
    z = o.rms_norm(streams, W[p + "hnorm.weight"], eps)
    x = o.linear(z, W[p + "h_proj.weight"]) + o.reshape(o.linear(e, W[p + "e_proj.weight"]), [b, s, 1, dim])
    h = o.act(x)
    new = {"start": start + s}
    h = block(o, cfg, W, cfg.num_hidden_layers, p, h, ids_next, state, new, "mtp", start, pos, ropes)
    return _head(o, cfg, W, p, h), new

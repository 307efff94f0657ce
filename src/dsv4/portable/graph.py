"""The DeepSeek V4 forward pass (and its MTP block), written once against `Ops`.

Traceable: `forward(ops, W, cfg, state, ids) -> (logits, streams)` updates `state` (a `cache.State`).
Shapes are static given (batch, chunk length, state capacity); positions are tensors derived from
`state.start`; there is no Python `if` on tensor values, so the same code runs eagerly (NumPy reference),
compiled (MLX), under CUDA graphs (torch) and as an exported ONNX graph.  One call handles any chunk: a
whole prompt, a chunk of it, or one decode token; the causal rules of model spec §4.4 are applied per
query, so a prefill query never sees a compressed entry from its own future, and CSA blocks that
straddle two calls pool the previous block's A-halves carried in the state (§4.5).

Work follows what is visible: each layer attends the window ring, the chunk's own keys, and the stored
entries as separate segments (no concatenated copy); the indexer scores the visible stored keys and the
chunk's new ones, then selects with a partial top-k.  Every layer reads the old state first and writes
its new rows last (`Ops.write_rows`), which is what lets a backend update the state in place.

`W` is the backend's weight store: `W[name]` gives a tensor by its official checkpoint name (linear
weights as the backend's quantized or dense object), `W.experts(prefix)` the routed experts of one layer.

Parallel runs (`portable.sharding`): on rank r of N, `W` holds that rank's parts (its query heads and
`wo_a` groups, indexer heads, E/N experts, 1/N of the shared expert and of the vocabulary) and the graph
works on the local sizes, joined by `Ops.all_reduce` / `Ops.all_gather` where the plan splits.  In one
process those are identities and every local size is the model's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .config import ModelConfig
from .ops import NEG_INF, Ops, Segment, yarn_inv_freq
from .sharding import shard


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


# ---------------------------------------------------------------------- rings (window, compressor rows)
def _static_min(s, n: int):
    """min(s, n) for a chunk length that is an int (eager, compiled) or a symbolic size (ONNX export)."""
    return min(s, n) if isinstance(s, int) else n


def ring_write(o, ring, rows, start, size: int):
    """Write a chunk's rows [B,S,·] into a ring of `size` rows (+1 spill row): position t → row t % size.
    Rows that a later row of the same chunk overwrites again go to the spill row."""
    s = rows.shape[1]
    r = o.reshape(o.arange(s), [1, s])
    dest = o.where(r >= s - size, (o.reshape(start, [-1, 1]) + r) % size, size)
    return o.write_rows(ring, o.broadcast_to(dest, [start.shape[0], s]), rows)


def ring_gather(o, ring, chunk, t, start):
    """Rows at positions t [B,M] from the ring (positions < start) or the chunk (positions ≥ start)."""
    size = ring.shape[1] - 1
    st = o.reshape(start, [-1, 1])
    old = o.gather_rows(o.read(ring), (t + size) % size)               # t ≥ −size here
    new = o.gather_rows(chunk, o.minimum(o.maximum(t - st, 0), chunk.shape[1] - 1))
    lead = list(t.shape) + [1] * (len(chunk.shape) - 2)
    return o.where(o.reshape(t < st, lead), old, new)


# ---------------------------------------------------------------------- compressor (§4.1, §4.5)
class Compressed:
    """What a compressor produced for a chunk: candidate entries e [B,nb,c] for blocks jb [B,nb] (`valid`
    where the block completes in this chunk, already in their stored rounding) and the projected rows."""

    def __init__(self, e, jb, valid, kv, gate):
        self.e, self.jb, self.valid, self.kv, self.gate = e, jb, valid, kv, gate


def compress(o: Ops, cfg: ModelConfig, W, prefix: str, layer: int, x, kv_ring, gate_ring, store, start, pos,
             rope_fn) -> Compressed:
    """Pool the blocks that complete in chunk x [B,S,D] (§4.5) from the ring of earlier projected rows
    and the chunk's own rows; `rope_fn(e, jpos)` rotates entries at their block-start positions j·m."""
    b, s, _ = x.shape
    m, ov = cfg.ratio(layer), cfg.overlap(layer)
    c = kv_ring.shape[2] // ov
    xh = o.hp(x)
    ckv = o.hp(o.linear(xh, W[prefix + "wkv.weight"]))
    cg = o.hp(o.linear(xh, W[prefix + "wgate.weight"])) + o.take(o.hp(W[prefix + "ape"]), pos % m, 0)
    nb = (s + m - 1) // m                                   # most blocks one chunk can complete
    st = o.reshape(start, [b, 1])
    jb = st // m + o.reshape(o.arange(nb), [1, nb])         # candidate entries [B,nb]
    valid = (jb + 1) * m <= st + s
    t = o.reshape(jb * m, [b, nb, 1]) + o.reshape(o.arange(m), [1, 1, m])           # own block's positions
    if ov == 2:
        t = o.concat([t - m, t], 2)                         # previous block's positions, then its own
    flat = o.reshape(t, [b, -1])
    before = o.reshape(flat < 0, [b, nb, ov * m, 1])        # the empty "previous block" of entry 0
    gkv = o.where(before, 0.0, o.reshape(ring_gather(o, kv_ring, ckv, flat, start), [b, nb, ov * m, ov * c]))
    gg = o.where(before, NEG_INF, o.reshape(ring_gather(o, gate_ring, cg, flat, start), [b, nb, ov * m, ov * c]))
    if ov == 2:                                             # A-halves of the previous block, B-halves of its own
        gkv = o.concat([gkv[:, :, :m, :c], gkv[:, :, m:, c:]], 2)
        gg = o.concat([gg[:, :, :m, :c], gg[:, :, m:, c:]], 2)
    e = o.act(o.compress_pool(gkv, gg))                                              # [B,nb,c]
    e = o.rms_norm(e, W[prefix + "norm.weight"], cfg.rms_norm_eps)
    e = store.rounded(o, rope_fn(e, jb * m))
    return Compressed(e, jb, valid, ckv, cg)


def store_compressed(o: Ops, cfg: ModelConfig, layer: int, comp: Compressed, rings: tuple, store, start,
                     capacity_rows: int):
    """Write a chunk's compressor results (after every read of the old state): its last projected rows
    into the rings, completed entries into the store (incomplete blocks into the spill row)."""
    size = cfg.pending_rows(layer)
    out = tuple(ring_write(o, ring, rows, start, size) for ring, rows in zip(rings, (comp.kv, comp.gate)))
    store.write(o, o.where(comp.valid, comp.jb, capacity_rows), comp.e)
    return out


def entry_counts(o: Ops, m: int, start, pos, nb):
    """Per query [B,S]: entries it sees among the stored ones (j < start // m) and among the chunk's
    candidates (row r ↔ entry start // m + r); together the causal rule j < ⌊(i+1)/m⌋ (§4.4)."""
    b = start.shape[0]
    held = o.reshape(start // m, [b, 1])
    visible = (pos + 1) // m
    return o.minimum(visible, held), o.minimum(o.maximum(visible - held, 0), nb)


# ---------------------------------------------------------------------- attention (§3, §4)
def window_segments(o: Ops, cfg: ModelConfig, ring, kv, start, pos) -> list:
    """The sliding window (§3.3) as two segments: the ring of earlier keys and the chunk's own keys."""
    b, s, _ = kv.shape
    w = cfg.sliding_window
    st = o.reshape(start, [b, 1])
    rho = o.reshape(o.arange(w + 1), [1, w + 1])
    held = o.where(rho < w, st - 1 - (st + w - 1 - rho) % w, -1)     # position in ring row ρ (−1: none)
    lo = o.maximum(pos - w + 1, 0)                                     # oldest position query i sees
    ring_seg = Segment.dense(o.read(ring), o.reshape(held, [b, 1, w + 1]) >= o.reshape(lo, [b, s, 1]))
    k = _static_min(s, w)
    r = o.reshape(o.arange(s), [1, s, 1]) - k + 1 + o.reshape(o.arange(k), [1, 1, k])   # chunk rows s−k+1..s
    band = o.broadcast_to(o.where(r >= 0, r, -1), [b, s, k])
    return [ring_seg, Segment.gather(kv, band)]


def attention(o: Ops, cfg: ModelConfig, W, layer: int, p: str, x, ls, start, pos, ropes, capacity: int):
    b, s, _ = x.shape
    sh = shard(cfg, o.rank, o.world)
    h, d, m = sh.heads, cfg.head_dim, cfg.ratio(layer)              # this rank's query heads
    eps = cfg.rms_norm_eps
    t = ropes[m > 0]
    qr = o.rms_norm(o.linear(x, W[p + "wq_a.weight"]), W[p + "q_norm.weight"], eps)
    q = o.head_rms(o.reshape(o.linear(qr, W[p + "wq_b.weight"]), [b, s, h, d]), eps)
    q = _rope(o, q, t)
    kv = o.rms_norm(o.linear(x, W[p + "wkv.weight"]), W[p + "kv_norm.weight"], eps)
    kv = o.kv_round(_rope(o, kv, t), cfg.nope_dim)
    segs = window_segments(o, cfg, ls.window, kv, start, pos)

    if m:
        # entries are rotated at their block-start positions j·m, not at the chunk's positions
        inv = yarn_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.yarn)

        def rope_at(e, jpos):
            return _rope(o, e, Rope(o, inv, jpos))

        rows = cfg.entries_capacity(layer, capacity)            # the spill row's index
        main = compress(o, cfg, W, p + "compressor.", layer, x, ls.kv, ls.gate, ls.entries, start, pos,
                        lambda e, jpos: o.kv_round(rope_at(e, jpos), cfg.nope_dim))
        nb = main.e.shape[1]
        n_old, n_new = entry_counts(o, m, start, pos, nb)
        if cfg.is_csa(layer):
            iround = o.rotate_fp4 if ls.index_keys.deploy else o.indexer_round      # keys stored as FP4
            idx = compress(o, cfg, W, p + "indexer.compressor.", layer, x, ls.index_kv, ls.index_gate,
                           ls.index_keys, start, pos, lambda e, jpos: iround(rope_at(e, jpos)))
            nh, ic = cfg.index_n_heads, cfg.index_head_dim
            qi = o.reshape(o.linear(qr, W[p + "indexer.wq_b.weight"]), [b, s, sh.index_heads, ic])
            qi = iround(_rope(o, qi, t))
            wts = o.linear(x, W[p + "indexer.weights_proj.weight"]) * (ic ** -0.5 * nh ** -0.5)
            sel_old, sel_new = o.indexer_topk(qi, wts, [(ls.index_keys.prefix(o, n_old), n_old), (idx.e, n_new)],
                                              cfg.index_topk)                 # narrowed to the rows it has
            kk = sel_old.shape[-1]
            picked = o.reshape(ls.entries.rows(o, o.reshape(sel_old, [b, s * kk])), [b, s, kk, d])
            segs += [Segment.per_query(picked, sel_old >= 0), Segment.gather(main.e, sel_new)]
        else:
            old = ls.entries.prefix(o, n_old)
            j_old = o.reshape(o.arange(old.shape[1]), [1, 1, old.shape[1]])
            j_new = o.reshape(o.arange(nb), [1, 1, nb])
            segs += [Segment.dense(old, j_old < o.reshape(n_old, [b, s, 1])),
                     Segment.dense(main.e, j_new < o.reshape(n_new, [b, s, 1]))]

    out = o.sink_attention(q, segs, W[p + "attn_sink"], 1.0 / math.sqrt(d))
    # every read of the old state is done: write this chunk's rows
    ls.window = ring_write(o, ls.window, kv, start, cfg.sliding_window)
    if m:
        ls.kv, ls.gate = store_compressed(o, cfg, layer, main, (ls.kv, ls.gate), ls.entries, start, rows)
    if cfg.is_csa(layer):
        ls.index_kv, ls.index_gate = store_compressed(o, cfg, layer, idx, (ls.index_kv, ls.index_gate),
                                                      ls.index_keys, start, rows)
    out = _rope(o, out, t, inverse=True)
    g = sh.groups
    u = o.grouped_linear(o.reshape(out, [b, s, g, cfg.heads_per_group * d]), W[p + "wo_a.weight"], g)
    return o.all_reduce(o.linear(o.act(o.reshape(u, [b, s, g * cfg.o_lora_rank])), W[p + "wo_b.weight"]))


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
    if o.world > 1:                 # expert parallel: this rank's experts, by their ids in its bank
        part = shard(cfg, o.rank, o.world).experts
        idx = o.where((idx >= part.start) & (idx < part.stop), idx - part.start, -1)
    y = o.moe(xf, idx, wts, W.experts(p + "experts."), lim)
    shared = o.act(o.expert(xf, W[p + "shared_experts.w1.weight"], W[p + "shared_experts.w2.weight"],
                            W[p + "shared_experts.w3.weight"], lim))
    return o.act(o.reshape(o.all_reduce(y + o.hp(shared)), [b, s, dim]))      # one combine per layer


# ---------------------------------------------------------------------- block and model
def block(o: Ops, cfg: ModelConfig, W, layer: int, p: str, h, ids, state, start, pos, ropes):
    it, he, eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
    x, post, comb = o.hc_pre(h, W[p + "hc_attn_fn"], W[p + "hc_attn_base"], W[p + "hc_attn_scale"], it, he, eps)
    x = o.rms_norm(x, W[p + "attn_norm.weight"], eps)
    f = attention(o, cfg, W, layer, p + "attn.", x, state.layer(layer), start, pos, ropes, state.capacity)
    h = o.hc_post(f, h, post, comb)
    x, post, comb = o.hc_pre(h, W[p + "hc_ffn_fn"], W[p + "hc_ffn_base"], W[p + "hc_ffn_scale"], it, he, eps)
    x = o.rms_norm(x, W[p + "ffn_norm.weight"], eps)
    return o.hc_post(moe(o, cfg, W, layer, p + "ffn.", x, ids), h, post, comb)


class HeadRows(NamedTuple):
    """The output head's rows that are not all zeros (`rows` [U,D]) and their ids (`ids` [U], a backend
    int array).  A model trained on part of the vocabulary (the demo: 1,225 of 129,280 ids) has exact
    zero rows for the rest, whose logits are exactly 0: scoring only these rows and placing them among
    zeros gives the same logits for a fraction of the head's cost.  Runners find them once
    (`GraphRunner.live_head`, `portable.weights.live_rows`); None where every row is live."""
    ids: object
    rows: object

    @classmethod
    def of(cls, o: Ops, head, ids) -> HeadRows:
        """The rows `ids` (host ints) of the loaded `head`, dense."""
        idx = o.asarray(ids, "int")
        return cls(idx, o.weight_rows(head, idx))


def _head(o: Ops, cfg: ModelConfig, W, p: str, h, head: HeadRows | None = None, widen: bool = True):
    y = o.hc_head(h, W[p + "hc_head_fn"], W[p + "hc_head_base"], W[p + "hc_head_scale"], cfg.hc_eps,
                  cfg.rms_norm_eps)
    y = o.rms_norm(y, W[p + "norm.weight"], cfg.rms_norm_eps)
    if head is None:
        return o.all_gather(o.linear(o.hp(y), o.hp(W["head.weight"])), -1)   # rank r: vocabulary part r
    logits = o.linear(o.hp(y), o.hp(head.rows))
    return o.widen(logits, head.ids, cfg.vocab_size) if widen else logits


def embed(o: Ops, cfg: ModelConfig, W, ids):
    """Embedding rows of ids [B,S]; a rank holds one vocabulary part and looks up only the ids in it (the
    others give exact zeros), so the sum over ranks is the lookup."""
    if o.world == 1:
        return o.act(o.weight_rows(W["embed.weight"], ids))
    part = shard(cfg, o.rank, o.world).vocab
    local = ids - part.start
    mine = (local >= 0) & (local < len(part))
    e = o.weight_rows(W["embed.weight"], o.where(mine, local, 0))
    return o.act(o.all_reduce(o.where(o.reshape(mine, list(ids.shape) + [1]), o.hp(e), 0.0)))


def _positions(o: Ops, start, s: int):
    b = start.shape[0]
    return o.reshape(start, [b, 1]) + o.reshape(o.arange(s), [1, s])


def forward(o: Ops, W, cfg: ModelConfig, state, ids, head: HeadRows | None = None):
    """Run a chunk of token ids [B,S] on `state` (a `cache.State` with capacity for start + S tokens),
    which it updates: each layer writes its new rows after reading the old ones.  Returns (logits [B,S,V]
    fp32/hp, streams), where `streams` [B,S,hc,D] are the residual streams before the HyperHead (the MTP
    block's input).  `head`: the head's live rows, when some are zeros (`HeadRows`)."""
    b, s = ids.shape
    start = state["start"]
    pos = _positions(o, start, s)
    ropes = rope_tables(o, cfg, pos)
    e = embed(o, cfg, W, ids)                                                     # [B,S,D]
    h = o.broadcast_to(o.reshape(e, [b, s, 1, cfg.hidden_size]), [b, s, cfg.hc_mult, cfg.hidden_size])
    for layer in range(cfg.num_hidden_layers):
        h = block(o, cfg, W, layer, f"layers.{layer}.", h, ids, state, start, pos, ropes)
    state.start = start + s
    return _head(o, cfg, W, "", h, head), h


def mtp_forward(o: Ops, W, cfg: ModelConfig, state, streams, ids_next, with_streams: bool = False,
                head: HeadRows | None = None, draft: bool = False):
    """The MTP block (§7): main streams at positions i plus token i+1 → logits for token i+2.  Updates the
    MTP block's own `state` (one window-only layer) like `forward`.  `with_streams` also returns the
    block's output streams [B,S,hc,D], which stand in for the main streams when the block drafts again
    from its own output (`portable.speculative`).  `head` as in `forward`; with `draft` the logits are
    those of its rows only, [B,S,U] (what a draft is drawn from)."""
    b, s = ids_next.shape
    start = state["start"]
    pos = _positions(o, start, s)
    ropes = rope_tables(o, cfg, pos)
    eps, dim = cfg.rms_norm_eps, cfg.hidden_size
    p = "mtp.0."
    e = o.rms_norm(embed(o, cfg, W, ids_next), W[p + "enorm.weight"], eps)
    z = o.rms_norm(streams, W[p + "hnorm.weight"], eps)
    x = o.linear(z, W[p + "h_proj.weight"]) + o.reshape(o.linear(e, W[p + "e_proj.weight"]), [b, s, 1, dim])
    h = o.act(x)
    h = block(o, cfg, W, cfg.num_hidden_layers, p, h, ids_next, state, start, pos, ropes)
    state.start = start + s
    logits = _head(o, cfg, W, p, h, head, widen=not draft)
    return (logits, h) if with_streams else logits

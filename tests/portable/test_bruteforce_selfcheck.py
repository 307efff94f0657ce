"""Self-checks of the brute-force float64 forward (tests/portable/bruteforce.py) on random weights.

These only test properties the spec guarantees (causality, window, visibility of compressed entries,
hash routing, finiteness); the numerical cross-check against the optimized graph lives elsewhere.
"""

import numpy as np
import pytest

from dsv4.portable.config import ModelConfig, preset

from . import bruteforce as bf
from .bruteforce import bruteforce_logits, bruteforce_mtp_logits, random_weights

T_MAIN = 136          # ≥ 128: the HCA layers of `tiny` see one entry from position 127 on


def _ids(cfg, T, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=T).astype(np.int64)


def _variant(**over):
    d = preset("tiny").to_dict()
    d.update(over)
    return ModelConfig.from_dict(d)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    W = random_weights(cfg, seed=0)
    ids = _ids(cfg, T_MAIN + 1, seed=1)
    logits = bruteforce_logits(cfg, W, ids[:-1])
    mtp = bruteforce_mtp_logits(cfg, W, ids[:-1], ids[1:])
    return cfg, W, ids, logits, mtp


# ---------------------------------------------------------------------------- basic sanity
def test_shapes_finite_not_flat(tiny):
    cfg, W, ids, logits, mtp = tiny
    for L in (logits, mtp):
        assert L.shape == (T_MAIN, cfg.vocab_size) and L.dtype == np.float64
        assert np.isfinite(L).all()
        assert L.std(axis=1).min() > 0.3                 # not flat over the vocabulary
        assert np.abs(L).max() < 100                     # not exploding
        assert L.std(axis=0).mean() > 0.3                # differs from position to position
    assert np.abs(logits - mtp).max() > 0.1              # the MTP head is a different function


def test_random_weights_deterministic_and_complete():
    cfg = preset("tiny")
    W1, W2 = random_weights(cfg, 3), random_weights(cfg, 3)
    assert W1.keys() == W2.keys()
    assert all(np.array_equal(W1[k], W2[k]) for k in W1)
    assert W1["layers.0.ffn.gate.tid2eid"].dtype == np.int64
    t = W1["layers.0.ffn.gate.tid2eid"]
    assert t.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in t.tolist())
    assert "layers.0.ffn.gate.bias" not in W1 and "layers.3.ffn.gate.bias" in W1
    assert W1["layers.1.attn.compressor.ape"].shape == (4, 2 * cfg.head_dim)
    assert W1["layers.2.attn.compressor.ape"].shape == (128, cfg.head_dim)
    assert W1["layers.1.attn.indexer.compressor.wkv.weight"].shape == (2 * cfg.index_head_dim, cfg.hidden_size)
    assert "layers.2.attn.indexer.wq_b.weight" not in W1
    assert "mtp.0.e_proj.weight" in W1 and "mtp.0.ffn.gate.bias" in W1


# ---------------------------------------------------------------------------- causality
def test_causality_main(tiny):
    cfg, W, ids, logits, _ = tiny
    t = 70
    ids2 = ids[:-1].copy()
    ids2[t] = (ids2[t] + 1) % cfg.vocab_size
    L2 = bruteforce_logits(cfg, W, ids2)
    np.testing.assert_allclose(L2[:t], logits[:t], rtol=0, atol=1e-10)
    assert np.abs(L2[t:] - logits[t:]).max(axis=1).min() > 1e-6   # every later position is affected


def test_causality_mtp(tiny):
    cfg, W, ids, _, mtp = tiny
    t = 100
    nxt = ids[1:].copy()
    nxt[t] = (nxt[t] + 1) % cfg.vocab_size
    M2 = bruteforce_mtp_logits(cfg, W, ids[:-1], nxt)
    np.testing.assert_allclose(M2[:t], mtp[:t], rtol=0, atol=1e-10)
    assert np.abs(M2[t] - mtp[t]).max() > 1e-6


# ---------------------------------------------------------------------------- routing
def test_hash_routing_selects_tid2eid():
    cfg = preset("tiny")
    W = random_weights(cfg, seed=5)
    rng = np.random.default_rng(0)
    W["layers.0.ffn.gate.bias"] = 50.0 * rng.standard_normal(cfg.n_routed_experts)   # must be ignored
    for _ in range(20):
        x = rng.standard_normal(cfg.hidden_size)
        tok = int(rng.integers(cfg.vocab_size))
        idx, w = bf.route(cfg, W, "layers.0.", True, x, tok)
        assert list(idx) == list(W["layers.0.ffn.gate.tid2eid"][tok])
        assert np.isclose(w.sum(), cfg.routed_scaling_factor)
        idx, w = bf.route(cfg, W, "layers.3.", False, x, tok)
        assert len(set(idx)) == cfg.num_experts_per_tok
        assert np.isclose(w.sum(), cfg.routed_scaling_factor)


def test_gate_bias_hash_vs_later_layer():
    cfg = preset("tiny")
    W = random_weights(cfg, seed=2)
    ids = _ids(cfg, 24, seed=3)
    base = bruteforce_logits(cfg, W, ids)
    E = cfg.n_routed_experts
    big = np.zeros(E)
    big[:cfg.num_experts_per_tok] = 100.0          # would force experts 0..k-1 if the bias were read

    Wh = dict(W)
    Wh["layers.0.ffn.gate.bias"] = big             # hash layer: bias is not even part of the checkpoint
    Wh["layers.1.ffn.gate.bias"] = -big
    np.testing.assert_array_equal(bruteforce_logits(cfg, Wh, ids), base)

    Wl = dict(W)
    Wl["layers.3.ffn.gate.bias"] = W["layers.3.ffn.gate.bias"] + big
    assert np.abs(bruteforce_logits(cfg, Wl, ids) - base).max() > 1e-3

    Wt = dict(W)                                    # ... while the hash table does matter
    Wt["layers.0.ffn.gate.tid2eid"] = (W["layers.0.ffn.gate.tid2eid"] + 1) % E
    assert np.abs(bruteforce_logits(cfg, Wt, ids) - base).max() > 1e-3


# ---------------------------------------------------------------------------- attention visibility
def _single_layer(ratio, window, **over):
    return _variant(num_hidden_layers=1, compress_ratios=[ratio], num_nextn_predict_layers=0,
                    num_hash_layers=0, sliding_window=window, **over)


def _dependence(cfg, W, ids, p):
    """Per position: max |Δlogit| when token p is changed."""
    a = bruteforce_logits(cfg, W, ids)
    ids2 = ids.copy()
    ids2[p] = (ids2[p] + 7) % cfg.vocab_size
    return np.abs(bruteforce_logits(cfg, W, ids2) - a).max(axis=1)


def test_sliding_window_single_swa_layer():
    win, T, p = 8, 40, 12
    cfg = _single_layer(0, win)
    W = random_weights(cfg, seed=4)
    dep = _dependence(cfg, W, _ids(cfg, T, 6), p)
    assert dep[:p].max() <= 1e-12                            # causal
    assert dep[p:p + win].min() > 1e-6                       # positions p .. p+win-1 see token p
    assert dep[p + win:].max() <= 1e-12                      # i ≥ p+win: token p < i-win+1 is out


def test_hca_entry_visibility_single_layer():
    # window 1: each query sees only its own kv plus entries j < floor((i+1)/128)
    T, p = 131, 5
    cfg = _single_layer(128, 1)
    W = random_weights(cfg, seed=7)
    dep = _dependence(cfg, W, _ids(cfg, T, 8), p)
    assert dep[:p].max() <= 1e-12
    assert dep[p] > 1e-6
    assert dep[p + 1:127].max() <= 1e-12                      # entry 0 invisible before i = 127
    assert dep[127:].min() > 1e-6                             # ... and visible from i = 127 on


def test_csa_entry_visibility_and_overlap_single_layer():
    # token 9 lies in block 2: B-half of entry 2 (visible from i = 11), A-half of entry 3 (from i = 15)
    T, p = 24, 9
    cfg = _single_layer(4, 1, index_topk=64)
    W = random_weights(cfg, seed=9)
    dep = _dependence(cfg, W, _ids(cfg, T, 10), p)
    assert dep[:p].max() <= 1e-12
    assert dep[p] > 1e-6
    assert dep[10] <= 1e-12
    assert dep[11:].min() > 1e-6
    # token 5 lies in block 1: B-half of entry 1 (visible from i = 7), A-half of entry 2 (from i = 11)
    dep5 = _dependence(cfg, W, _ids(cfg, T, 10), 5)
    assert dep5[6] <= 1e-12 and dep5[7:].min() > 1e-6


def test_csa_topk_limits_entries():
    # with index_topk = 1 and window 1, a query sees one compressed entry: token p influences a later query
    # only when the indexer picks an entry containing it; with top-k = all entries it always does.
    T = 40
    cfg_all = _single_layer(4, 1, index_topk=64)
    cfg_one = _single_layer(4, 1, index_topk=1)
    W = random_weights(cfg_all, seed=11)
    ids = _ids(cfg_all, T, 12)
    dep_all = _dependence(cfg_all, W, ids, 2)                # token 2 → entry 0 (B) and entry 1 (A)
    dep_one = _dependence(cfg_one, W, ids, 2)
    assert dep_all[3:].min() > 1e-6
    assert (dep_one[8:] <= 1e-12).sum() > 0                  # some later queries picked another entry


# ---------------------------------------------------------------------------- pieces
def test_stable_topk_ties_prefer_lower_index():
    s = np.array([0.0, 2.0, 1.0, 2.0, 2.0, -1.0])
    assert bf.stable_topk_desc(s, 2) == [1, 3]
    assert bf.stable_topk_desc(s, 4) == [1, 3, 4, 2]
    assert bf.stable_topk_desc(np.zeros(5), 3) == [0, 1, 2]


def test_sinkhorn_comb_doubly_stochastic_and_pre_post_ranges():
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    hc, D = cfg.hc_mult, cfg.hidden_size
    fn = rng.standard_normal(((2 + hc) * hc, hc * D)) * 0.05
    pre, post, comb = bf.hc_coeffs(cfg, rng.standard_normal((hc, D)), fn, rng.standard_normal((2 + hc) * hc),
                                   np.ones(3))
    np.testing.assert_allclose(comb.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(comb.sum(axis=1), 1.0, atol=1e-3)
    assert (pre > 0).all() and (pre < 1 + 2e-6).all()
    assert (post > 0).all() and (post < 2).all()
    # expand uses comb transposed: h_new[k] = post_k f + Σ_j comb[j,k] res[j]
    res = rng.standard_normal((hc, D))
    f = rng.standard_normal(D)
    out = bf.hc_expand(f, res, post, comb)
    np.testing.assert_allclose(out, post[:, None] * f[None] + comb.T @ res, atol=1e-12)


def test_rope_yarn_table_and_inverse():
    cfg = preset("tiny")
    inv = bf.rope_inv_freq(cfg, 4)
    plain = 160000.0 ** (-np.arange(32) * 2 / 64)
    ratio = inv / plain
    np.testing.assert_allclose(ratio[:16], 1.0)               # low = 15: pairs 0..15 keep their frequency
    np.testing.assert_allclose(ratio[25:], 1 / 16)            # high = 25: pairs ≥ 25 divided by 16
    assert ((ratio[16:25] < 1) & (ratio[16:25] > 1 / 16)).all()
    np.testing.assert_allclose(bf.rope_inv_freq(cfg, 0), 10000.0 ** (-np.arange(32) * 2 / 64))
    v = np.random.default_rng(1).standard_normal((3, 128))
    w = bf.rope_last(v, 37, inv)
    np.testing.assert_array_equal(w[:, :64], v[:, :64])       # nope dims first, untouched
    np.testing.assert_allclose(bf.rope_last(w, -37, inv), v, atol=1e-12)
    # interleaved pair p = (64+2p, 64+2p+1) rotated by pos*inv[p]
    a = 37 * inv[5]
    np.testing.assert_allclose(w[0, 74], v[0, 74] * np.cos(a) - v[0, 75] * np.sin(a))


def test_pool_entry_receptive_fields():
    cfg = preset("tiny")
    rng = np.random.default_rng(3)
    D, c = cfg.hidden_size, 128
    x = rng.standard_normal((24, D))
    inv = bf.rope_inv_freq(cfg, 4)
    zero = np.zeros_like(inv)

    def pool(x, j, m, coff, rope=zero):
        g = np.random.default_rng(m)                     # same weights on every call
        wkv, wg = g.standard_normal((coff * c, D)) / 16, g.standard_normal((coff * c, D)) / 16
        ape = 0.1 * g.standard_normal((m, coff * c))
        return bf.pool_entry(cfg, x, j, m, c, wkv, wg, ape, np.ones(c), rope)

    def touched(j, m, coff, rows):
        x2 = x.copy()
        x2[rows] += 1.0
        return np.abs(pool(x2, j, m, coff) - pool(x, j, m, coff)).max() > 1e-9

    # overlap (m = 4): entry j pools block j-1 (A-halves) and block j (B-halves), nothing else
    j = 3
    assert touched(j, 4, 2, [8]) and touched(j, 4, 2, [11])           # block 2 = previous block
    assert touched(j, 4, 2, [12]) and touched(j, 4, 2, [15])          # block 3 = own block
    assert not touched(j, 4, 2, [7]) and not touched(j, 4, 2, [16])
    assert touched(0, 4, 2, [0]) and not touched(0, 4, 2, [4])
    # entry 0 has an empty previous block (kv 0, gate -inf): it is a 4-slot pool of block 0's B-halves
    g = np.random.default_rng(4)
    wkv, wg = g.standard_normal((2 * c, D)) / 16, g.standard_normal((2 * c, D)) / 16
    ape = 0.1 * g.standard_normal((4, 2 * c))
    e0 = bf.pool_entry(cfg, x, 0, 4, c, wkv, wg, ape, np.ones(c), zero)
    kvB = (x[0:4] @ wkv.T)[:, c:]
    gB = (x[0:4] @ wg.T)[:, c:] + ape[:, c:]
    p = np.exp(gB - gB.max(0)) / np.exp(gB - gB.max(0)).sum(0)
    np.testing.assert_allclose(e0, bf.rms_norm((p * kvB).sum(0), np.ones(c), cfg.rms_norm_eps), atol=1e-12)
    # entry 1 mixes the A-halves of block 0 with the B-halves of block 1
    e1 = bf.pool_entry(cfg, x, 1, 4, c, wkv, wg, ape, np.ones(c), zero)
    kv8 = np.concatenate([(x[0:4] @ wkv.T)[:, :c], (x[4:8] @ wkv.T)[:, c:]])
    g8 = np.concatenate([(x[0:4] @ wg.T)[:, :c] + ape[:, :c], (x[4:8] @ wg.T)[:, c:] + ape[:, c:]])
    p8 = np.exp(g8 - g8.max(0)) / np.exp(g8 - g8.max(0)).sum(0)
    np.testing.assert_allclose(e1, bf.rms_norm((p8 * kv8).sum(0), np.ones(c), cfg.rms_norm_eps), atol=1e-12)
    # non-overlap (m = 8 here for speed; the code path is the one used for m = 128)
    assert touched(1, 8, 1, [8]) and touched(1, 8, 1, [15])
    assert not touched(1, 8, 1, [7]) and not touched(1, 8, 1, [16])
    # RoPE at j*m (start of the entry's own block)
    np.testing.assert_allclose(pool(x, 3, 4, 2, inv), bf.rope_last(pool(x, 3, 4, 2), 12, inv), atol=1e-12)

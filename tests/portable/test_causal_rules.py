"""The subtle places peers got wrong: compressed-entry causality, indexer top-k dropping, hash routing."""

import numpy as np
import pytest

import dsv4
from dsv4.portable.reference import NumpyOps


class Spy(NumpyOps):
    """Reference ops that record what the graph asked the indexer and the MoE to do."""

    def __init__(self):
        super().__init__("float64")
        self.topk_calls, self.moe_calls = [], []

    def indexer_topk(self, qi, w, segments, k):
        """Records (visible count, picked entry ids); used on one-shot forwards, where no entry is stored
        yet, so the stored segment is empty and the new segment's row r is entry r."""
        old, new = super().indexer_topk(qi, w, segments, k)
        (_, n_old), (_, n_new) = segments
        assert (old < 0).all() and (n_old == 0).all()
        self.topk_calls.append((n_old + n_new, new.copy()))
        return old, new

    def moe(self, x, idx, wts, experts, limit):
        self.moe_calls.append((idx.copy(), wts.copy()))
        return super().moe(x, idx, wts, experts, limit)


def spy_model(path):
    model = dsv4.load(path, dtype="float64", context=512)
    spy = Spy()
    model.runner.ops = spy
    return model, spy


def test_future_tokens_never_leak(tiny_any, rand_ids):
    """Perturbing tokens ≥ t leaves every logit at positions < t unchanged, for cut points on and off the
    ratio-4 / ratio-128 / window boundaries (no query sees an entry with j ≥ ⌊(i+1)/m⌋)."""
    model = dsv4.load(tiny_any, dtype="float64", context=512)
    ids = rand_ids(300, seed=21)
    base = model.forward(ids, full_precision=True)
    for t in (3, 128, 129, 256, 257):
        other = ids.copy()
        other[t:] = rand_ids(300 - t, seed=100 + t)
        other[t] = (ids[t] + 1) % 1024 or 3
        got = model.forward(other, full_precision=True)
        # a leak moves logits by ≳1e-3; BLAS may round row subsets differently by ~1e-14 (MoE rows)
        np.testing.assert_allclose(got[:t], base[:t], rtol=0, atol=1e-9, err_msg=f"cut at {t}")
        assert np.abs(got[t] - base[t]).max() > 1e-3, f"token {t} had no effect on its own position"


def test_indexer_drops_entries_from_position_19(tiny_dir, rand_ids):
    """With index_topk 4 the CSA selection is 'all visible entries' up to i = 18 and drops from i = 19."""
    model, spy = spy_model(tiny_dir)
    assert model.config.index_topk == 4
    model.forward(rand_ids(40, seed=2), full_precision=True)
    assert spy.topk_calls, "no CSA layer called the indexer"
    for visible, sel in spy.topk_calls:
        vis, sel = visible[0], sel[0]
        n_sel = (sel >= 0).sum(-1)
        np.testing.assert_array_equal(n_sel, np.minimum(vis, 4))
        assert (sel < vis[:, None]).all(), "a selected entry is not causally visible"
        for i in range(19):                               # before 19: exactly the visible set
            assert set(sel[i][sel[i] >= 0]) == set(range(vis[i]))
        assert vis[19] == 5 and n_sel[19] == 4            # first query with more visible entries than k


def test_hash_layers_route_by_tid2eid(tiny_dir, rand_ids):
    model, spy = spy_model(tiny_dir)
    ids = rand_ids(50, seed=4)
    model.forward(ids, full_precision=True)
    cfg = model.config
    table = np.asarray(model.runner.weights["layers.0.ffn.gate.tid2eid"])
    assert len(spy.moe_calls) == cfg.num_hidden_layers
    for layer, (idx, wts) in enumerate(spy.moe_calls):
        np.testing.assert_allclose(wts.sum(-1), cfg.routed_scaling_factor, rtol=1e-12)
        if layer < cfg.num_hash_layers:
            t = np.asarray(model.runner.weights[f"layers.{layer}.ffn.gate.tid2eid"])
            np.testing.assert_array_equal(idx, t[ids])
        else:
            assert not (idx == table[ids]).all()


def test_gate_bias_selects_but_does_not_weight(tiny_dir, rand_ids):
    """A huge bias on one expert forces its selection in biased layers, yet weights stay the unbiased
    sqrtsoftplus scores (renormalized)."""
    model, spy = spy_model(tiny_dir)
    w = model.runner.weights
    name = "layers.3.ffn.gate.bias"
    bias = w[name].copy()
    w._cache[name] = bias + np.where(np.arange(bias.size) == 5, 1e3, 0.0)
    model.forward(rand_ids(30, seed=9), full_precision=True)
    idx, wts = spy.moe_calls[3]
    assert (idx == 5).any(-1).all()
    assert wts.max() < model.config.routed_scaling_factor      # not collapsed onto the biased expert


def test_over_long_input_names_the_limit(tiny_dir):
    model = dsv4.load(tiny_dir, context=64)
    with pytest.raises(dsv4.ContextError, match="65 tokens exceed this model's context of 64"):
        model.forward(np.arange(3, 68))

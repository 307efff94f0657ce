"""The state follows the text (issue: long context): in-place writes of only the new rows, forks, growth
across capacity buckets, the deploy storage format, and a context-1M smoke test on the reference."""

import json
import shutil

import numpy as np
import pytest

import dsv4
from dsv4.portable import cache, quant
from dsv4.portable.cache import capacity_for, state_bytes
from dsv4.portable.reference import NumpyOps


def feed(model, state, ids, sizes):
    outs, a = [], 0
    for n in sizes:
        logits, _ = model.runner.step(state, ids[None, a:a + n])
        outs.append(logits[0])
        a += n
    return np.concatenate(outs, 0)


def rel_err(got, want):
    return (np.abs(got - want).max(-1) / np.abs(want).max(-1)).max()


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_decode_step_writes_only_its_new_rows(tiny_dir, rand_ids, fmt):
    """A decode step at position p changes window row p % W, ring row p % R of each compressor, and entry
    p // m only when p completes a block — nothing else but spill rows — in the same buffers."""
    model = dsv4.load(tiny_dir, dtype="float64", context=1024, state_format=fmt)
    cfg = model.config
    ids = rand_ids(208, seed=4)
    state = model.new_state(1)
    model.runner.step(state, ids[None, :207])
    before = {k: np.array(v, copy=True) for k, v in state.items()}
    objects = {k: id(v) for k, v in state.items() if k != "start"}       # `start` is [B] ints, set anew
    p = 207                                             # completes a ratio-4 block; mid-block for ratio 128
    model.runner.step(state, ids[None, p:p + 1])
    assert {k: id(v) for k, v in state.items() if k != "start"} == objects, "a buffer was replaced, not written in place"
    touched = 0
    for name, new in state.items():
        if name == "start":
            continue
        old = before[name]
        changed = set(np.nonzero((old != new).reshape(old.shape[0], old.shape[1], -1).any(-1)[0])[0])
        changed.discard(old.shape[1] - 1)                               # the spill row
        layer = cfg.num_hidden_layers if name.startswith("mtp") else int(name.split(".")[0][1:])
        m = cfg.ratio(layer)
        if name.endswith(".window"):
            allowed = {p % cfg.sliding_window}
        elif name.endswith((".kv", ".gate")):
            allowed = {p % cfg.pending_rows(layer)}
        else:                                                          # entries / index keys (any part)
            allowed = {p // m} if (p + 1) % m == 0 else set()
        assert changed <= allowed, f"{name}: rows {sorted(changed)} written, only {sorted(allowed)} allowed"
        assert changed == allowed or name.endswith(".scale"), f"{name}: new row {allowed} not written"
        touched += len(changed)
    assert touched > 0


def test_fork_gives_independent_states(tiny_dir, rand_ids):
    model = dsv4.load(tiny_dir, dtype="float64", context=512)
    ids = rand_ids(60, seed=8)
    parent = model.new_state(1)
    model.step(parent, ids[None, :50])
    child = model.fork_state(parent)
    assert all(child[k] is not v for k, v in parent.items())
    a, _ = model.step(parent, ids[None, 50:60])
    other = rand_ids(10, seed=9)
    b, _ = model.step(child, other[None])
    want_a = model.forward(ids, full_precision=True)[50:60]
    want_b = model.forward(np.concatenate([ids[:50], other]), full_precision=True)[50:60]
    assert rel_err(a[0], want_a) < 1e-6 and rel_err(b[0], want_b) < 1e-6
    assert np.abs(a - b).max() > 1e-3                                   # the two really diverged
    assert model.state_info(parent)["tokens"] == model.state_info(child)["tokens"] == 60


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_ladder_across_capacity_buckets(tiny_any, rand_ids, fmt):
    """One shot == uneven chunks == decodes while the state grows 128 → 256 → 384 → 512 → 640 tokens."""
    model = dsv4.load(tiny_any, dtype="float64", context=2048, state_format=fmt)
    ids = rand_ids(600, seed=12)
    one = model.forward(ids, full_precision=True)
    state = model.new_state(1)
    assert model.state_info(state)["capacity"] == 128
    sizes = [100, 27, 1, 1, 200, 1, 1, 1, 140, 129]
    caps = []
    a = 0
    outs = []
    for n in sizes:
        logits, _ = model.runner.step(state, ids[None, a:a + n])
        outs.append(logits[0])
        a += n
        caps.append(model.state_info(state)["capacity"])
    assert caps[2] == 128 and caps[3] == 256 and caps[-1] == capacity_for(600) == 640
    assert rel_err(np.concatenate(outs), one) < 1e-10


def test_deploy_format_differs_from_bf16_by_storage_rounding_only(tiny_dir, rand_ids):
    """FP8/FP4 storage moves logits (so it is really used), typically by far less than the signal (a tiny
    random model is ill-conditioned: a rounding can flip an expert choice at a single position)."""
    ids = rand_ids(200, seed=3)
    plain = dsv4.load(tiny_dir, dtype="float64", context=512).forward(ids, full_precision=True)
    deploy = dsv4.load(tiny_dir, dtype="float64", context=512, state_format="deploy").forward(ids, full_precision=True)
    d = np.abs(deploy - plain).max(-1) / np.abs(plain).max(-1)
    assert d[:3].max() < 1e-12                                          # no entry exists before position 3
    assert d.max() > 1e-6 and np.median(d) < 0.05


def test_deploy_entries_are_stored_as_fp8_fp4_bytes(tiny_dir, rand_ids):
    model = dsv4.load(tiny_dir, dtype="bfloat16", context=512, state_format="deploy")
    state = model.new_state(1)
    model.step(state, rand_ids(131, seed=5)[None])
    b = state.buffers
    assert b["L1.entries.nope"].dtype == np.uint8 and b["L1.entries.scale"].dtype == np.uint8
    assert b["L1.entries.rope"].dtype == np.uint16 and b["L0.window"].dtype == np.uint16    # bf16 words
    assert b["L1.index.keys.fp4"].shape[-1] == model.config.index_head_dim // 2
    codes = b["L1.entries.nope"][0, :32]
    assert len(np.unique(codes)) > 50                                    # real FP8 bytes, not a constant
    vals = quant.decode_fp8_blocks(codes, b["L1.entries.scale"][0, :32], 64)
    assert np.isfinite(vals).all() and np.abs(vals).max() > 0


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_state_bytes_held_follow_the_byte_model(tiny_dir, rand_ids, fmt):
    """bfloat16 state bytes after n tokens lie between the byte model at n and at the capacity (+ one
    spill/ring row per buffer)."""
    model = dsv4.load(tiny_dir, dtype="bfloat16", context=4096, state_format=fmt)
    state = model.new_state(1)
    model.step(state, rand_ids(700, seed=6)[None])
    info = model.state_info(state)
    spill = sum(v.nbytes // v.shape[1] for k, v in state.items() if k != "start")
    assert info["tokens"] == 700 and info["capacity"] == capacity_for(700)
    assert state_bytes(model.config, 700, fmt) <= info["bytes"]
    assert info["bytes"] <= state_bytes(model.config, info["capacity"], fmt) + spill + 8


def test_context_1m_costs_what_the_text_costs(tiny_dir, rand_ids, tmp_path):
    """Loaded with a 1M context, a 300-token text holds the same bytes and gives the same logits as with
    a 4K context: the state is sized by the tokens held."""
    big = tmp_path / "tiny-1m"
    shutil.copytree(tiny_dir, big)
    cfg = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1 << 20}))
    ids = rand_ids(300, seed=13)
    out = {}
    for ctx in (4096, 1 << 20):
        model = dsv4.load(big, dtype="float32", context=ctx)
        assert model.context == ctx
        state = model.new_state(1)
        logits = feed(model, state, ids, [200] + [1] * 100)
        out[ctx] = (logits, model.state_info(state))
    (a, ia), (b, ib) = out[4096], out[1 << 20]
    assert ia == ib and ia["capacity"] == 384
    assert ib["bytes"] < 3 * state_bytes(dsv4.load(big).config, 300)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_partial_topk_keeps_the_tie_rule():
    """Ties → lower index, largest first, exactly as a stable descending sort, on heavily tied input."""
    o = NumpyOps("float64")
    rng = np.random.default_rng(0)
    for n, k in ((50, 7), (33, 32), (8, 8), (1000, 64)):
        x = rng.integers(0, 4, size=(3, 5, n)).astype(np.float64)
        x[0, 0] = 0.0
        want = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(o.topk(x, k), want)


def test_codecs_round_trip_to_the_emulation_roundings():
    o = NumpyOps("float32")
    x = (np.random.default_rng(1).standard_normal((4, 6, 128)) * np.logspace(-3, 2, 128)).astype(np.float32)
    np.testing.assert_array_equal(o.decode_fp8(*o.encode_fp8(x, 64), 64), quant.act_fp8_round(x, 64))
    np.testing.assert_array_equal(o.decode_fp4(*o.encode_fp4(x, 32), 32), quant.act_fp4_round(x, 32))
    h = quant.hadamard(128)
    np.testing.assert_allclose(o.rotate_fp4(x), quant.act_fp4_round(x @ h, 32), rtol=0, atol=1e-6)


def test_an_unknown_state_format_is_refused_at_load(tiny_dir):
    with pytest.raises(ValueError, match="unknown state format 'fp3'; use 'bf16' or 'deploy'"):
        dsv4.load(tiny_dir, context=64, state_format="fp3")


def test_deploy_format_only_where_its_blocks_tile_the_entries():
    """The demo's 32 nope dims are below the deploy format's 64-wide FP8 block: its bfloat16 runs default
    to entries as computed, and asking for "deploy" is one clear error, not a crash inside a step."""
    from dsv4.portable.config import preset
    from dsv4.portable.runtime import default_state_format
    demo, tiny = preset("demo"), preset("tiny")
    assert not cache.deploy_fits(demo) and cache.deploy_fits(tiny)
    assert default_state_format("mlx", "bfloat16", demo) == "bf16"
    assert default_state_format("mlx", "bfloat16", tiny) == "deploy"
    with pytest.raises(ValueError, match="do not divide"):
        cache.check_format("deploy", demo)

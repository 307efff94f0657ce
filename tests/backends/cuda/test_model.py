"""Whole-model parity of the torch op path (float32 on the CPU) against the float64 NumPy oracle, in both
state formats (the oracle stores the same format: "deploy" = FP8/FP4 entries), and bfloat16 deploy runs
against the reference's own bfloat16 deploy path, judged statistically."""

import numpy as np
import pytest

import dsv4

CTX = 512
TOL = 1e-4


def _rel(a, ref):
    """Per-position max |error| relative to the position's max |logit|."""
    return float((np.abs(a - ref).max(-1) / np.abs(ref).max(-1)).max())


def _typical(a, ref):
    """The 90th percentile over positions of the per-position error (robust to a few FP8 rounding flips)."""
    return float(np.quantile(np.abs(a - ref).max(-1) / np.abs(ref).max(-1), 0.9))


@pytest.fixture(scope="module")
def oracle():
    """Float64 reference logits of a fresh random 300-token sequence, per tiny checkpoint and state format
    (computed once)."""
    cache = {}

    def get(path, seed, fmt="bf16"):
        if (path, fmt) not in cache:
            ids = np.random.default_rng(seed).integers(3, 1024, 300)
            ref = dsv4.load(path, backend="reference", dtype="float64", context=CTX, state_format=fmt)
            cache[path, fmt] = ids, ref.forward(ids, full_precision=True), ref
        return cache[path, fmt]
    return get


def test_forward_parity_all_positions(tiny_any, oracle):
    ids, ref, _ = oracle(tiny_any, 11)
    m = dsv4.load(tiny_any, backend="cuda", dtype="float32", context=CTX)
    out = m.forward(ids)
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert _rel(out, ref) <= TOL


def test_float64_matches_oracle_to_rounding(tiny_dir, oracle):
    ids, ref, _ = oracle(tiny_dir, 11)
    out = dsv4.load(tiny_dir, backend="cuda", dtype="float64", context=CTX).forward(ids, full_precision=True)
    assert out.dtype == np.float64 and _rel(out, ref) <= 1e-12


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_state_ladder(tiny_dir, oracle, fmt):
    """One-shot == prefill 201 + 99 decode steps == uneven chunks 37+64+100+99 (crossing the 128 window,
    ratio-4 overlap, the first two ratio-128 blocks and top-k dropping), all within the parity tolerance,
    while the state grows from the 128-token bucket through 256 to 384 (context 512 is only the limit)."""
    ids, ref, _ = oracle(tiny_dir, 11, fmt)
    m = dsv4.load(tiny_dir, backend="cuda", dtype="float32", context=CTX, state_format=fmt)
    one = m.forward(ids)

    st, outs, caps = m.new_state(), [], []
    logits, st = m.step(st, ids[None, :201])
    outs.append(logits[0])
    for i in range(201, 300):
        logits, st = m.step(st, ids[None, i:i + 1])
        outs.append(logits[0])
        caps.append(st.capacity)
    decode = np.concatenate(outs, 0)
    assert caps[0] == 256 and caps[-1] == 384

    st, outs, a = m.new_state(), [], 0
    assert st.capacity == 128 and st.fmt == fmt
    for n in (37, 64, 100, 99):
        logits, st = m.step(st, ids[None, a:a + n])
        outs.append(logits[0])
        a += n
        caps.append(st.capacity)
    chunks = np.concatenate(outs, 0)
    assert caps[-4:] == [128, 128, 256, 384]
    for got in (decode, chunks):
        if fmt == "bf16":
            assert _rel(got, ref) <= TOL and _rel(got, one) <= 1e-5
        else:      # float32 rounding differences may tip an entry across an FP8 step on some positions
            assert _typical(got, ref) <= TOL and _typical(got, one) <= 1e-5
    assert m.runner.position(st) == 300
    assert m.state_info(st) == {"tokens": 300, "capacity": 384, "bytes": st.nbytes()}


def test_bf16_deploy_matches_reference_deploy_statistically(tiny_dir, oracle):
    """bfloat16 with the deploy state format (the default for bfloat16 on this backend) vs the reference's
    own bfloat16 deploy path: about as close to the float64 deploy oracle as that emulation is (the floor:
    two bf16 implementations drift apart to bf16 noise, so no per-position bound can hold)."""
    ids, exact, _ = oracle(tiny_dir, 11, "deploy")
    m = dsv4.load(tiny_dir, backend="cuda", dtype="bfloat16", context=CTX)
    assert m.runner.state_format == "deploy"
    out = m.forward(ids)
    emu = dsv4.load(tiny_dir, backend="reference", dtype="bfloat16", context=CTX, state_format="deploy").forward(ids)

    def rel_err(x, ref):
        return np.abs(x - ref).max(-1) / np.abs(ref).max(-1)
    floor_med, med = np.median(rel_err(emu, exact)), np.median(rel_err(out, exact))
    floor_agree = (emu.argmax(-1) == exact.argmax(-1)).mean()
    assert 0 < med <= 2.0 * floor_med
    assert (out.argmax(-1) == exact.argmax(-1)).mean() >= floor_agree - 0.1
    assert np.median(rel_err(out, emu)) <= 3.0 * floor_med


@pytest.mark.parametrize("fmt", ["bf16", "deploy"])
def test_emulated_numerics_match_reference(tiny_dir, rand_ids, fmt):
    """emulate=True (activation FP8, kv_round, indexer_round; with "deploy" the stored FP8/FP4 codes on top)
    in float64 equals the reference's emulation to rounding, and really changes the logits."""
    ids = rand_ids(160, seed=4)
    kw = dict(dtype="float64", context=CTX, state_format=fmt)
    ref = dsv4.load(tiny_dir, backend="reference", emulate=True, **kw).forward(ids, full_precision=True)
    got = dsv4.load(tiny_dir, backend="cuda", emulate=True, **kw).forward(ids, full_precision=True)
    plain = dsv4.load(tiny_dir, backend="cuda", **kw).forward(ids, full_precision=True)
    assert _rel(got, ref) <= 1e-12 < _rel(plain, ref)


def test_chunked_prefill_option(tiny2_dir, oracle):
    ids, ref, _ = oracle(tiny2_dir, 11)
    m = dsv4.load(tiny2_dir, backend="cuda", dtype="float32", context=CTX, prefill_chunk=70)
    logits, st = m.step(m.new_state(), ids[None])
    assert _rel(logits[0], ref) <= TOL and m.runner.position(st) == 300


def test_mtp_parity(tiny_any, oracle):
    ids, _, ref = oracle(tiny_any, 11)
    main, nxt = ids[:200], ids[1:201]
    want = ref.mtp_forward(main, nxt)
    got = dsv4.load(tiny_any, backend="cuda", dtype="float32", context=CTX).mtp_forward(main, nxt)
    assert got.shape == want.shape and _rel(got, want) <= TOL


def _greedy(model, prompt, n):
    st = model.new_state()
    logits, st = model.step(st, np.asarray(prompt)[None])
    out, gaps = [], []
    for _ in range(n):
        last = logits[0, -1]
        tok = int(np.argmax(last))
        gaps.append(float(np.sort(last)[-1] - np.sort(last)[-2]))
        out.append(tok)
        logits, st = model.step(st, np.asarray([[tok]]))
    return out, min(gaps)


def test_greedy_64_tokens_identical(tiny_dir, oracle):
    _, _, ref = oracle(tiny_dir, 11)
    prompt = np.random.default_rng(5).integers(3, 1024, 24)
    want, gap = _greedy(ref, prompt, 64)
    got, _ = _greedy(dsv4.load(tiny_dir, backend="cuda", dtype="float32", context=CTX), prompt, 64)
    assert gap > 1e-3, "reference has a near-tie; pick another prompt seed"
    assert got == want

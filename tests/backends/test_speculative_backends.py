"""Speculative decoding on every backend: greedy output identical to the same backend's plain decoding
with drafts rejected at every offset across the window (128) and ratio-4/ratio-128 block boundaries,
batched; MLX's compiled verify step is traced once, not per round; an ONNX export drafts one token."""

import importlib.util

import pytest

import dsv4
from tests.portable.test_speculative import Oracle

CONTEXT = 512
BACKENDS = [b for b, mod in (("mlx", "mlx"), ("cuda", "torch"), ("onnx", "onnxruntime"))
            if importlib.util.find_spec(mod) is not None]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_dir, onnx_export):
    if request.param == "onnx":
        return dsv4.load(onnx_export(tiny_dir, CONTEXT), backend="onnx", context=CONTEXT)
    return dsv4.load(tiny_dir, backend=request.param, dtype="float32", context=CONTEXT)


def _plain(model, prompt, n):
    return model.generate(prompt, max_tokens=n, draft_tokens=0, stop_ids=[]).tokens


@pytest.mark.parametrize("k", [2, 3])
def test_greedy_identity_with_rejections_across_boundaries(model, rand_ids, monkeypatch, k):
    prompt = list(rand_ids(118, seed=40 + k))
    want = _plain(model, prompt, 16)
    wrong = {len(prompt) + 1 + i for i in range(0, 16, 2 + (k % 2))}
    monkeypatch.setattr(model, "mtp_step", Oracle(model, prompt + want, wrong))
    got = model.generate(prompt, max_tokens=16, draft_tokens=k, stop_ids=[])
    assert got.tokens == want
    assert 0 < got.accepted < got.drafted
    if model.backend == "onnx":                       # the export's MTP graph returns no streams to chain on
        assert got.drafted <= 16


def test_batched_drafting_matches_plain(model, rand_ids):
    prompts = [list(rand_ids(n, seed=50 + n)) for n in (12, 33)]
    got = model.generate_batch(prompts, max_tokens=10, draft_tokens=2, stop_ids=[])
    assert [r.tokens for r in got] == [_plain(model, p, 10) for p in prompts]


@pytest.mark.skipif("mlx" not in BACKENDS, reason="needs mlx")
def test_mlx_compiled_verify_step_is_traced_once(tiny_dir, rand_ids):
    m = dsv4.load(tiny_dir, backend="mlx", dtype="float32", context=CONTEXT, compile=True)
    prompt = list(rand_ids(20, seed=9))
    want = _plain(m, prompt, 12)
    assert m.generate(prompt, max_tokens=12, draft_tokens=2, stop_ids=[]).tokens == want
    traces = m.runner.traces
    assert m.generate(prompt, max_tokens=12, draft_tokens=2, stop_ids=[]).tokens == want
    assert m.runner.traces == traces                  # every round replays the compiled [1, 3] verify

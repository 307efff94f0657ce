"""The shipped demo answers: a fixed sample of 20 problems per mode, greedy on the reference backend."""

import numpy as np
import pytest

import dsv4
from dsv4.cli.resolve import is_demo
from dsv4.portable.checkpoint import Checkpoint

SEED = 7            # a fixed sample (the training corpus was drawn with seed 0)
N = 20


def test_the_demo_is_the_official_layout_with_zero_unused_rows(demo):
    assert is_demo(demo.config) and demo.config.vocab_size == 129280
    ckpt = Checkpoint(demo.path)
    assert ckpt.spec("layers.1.attn.wq_a.weight").dtype == "F8_E4M3"
    assert ckpt.spec("layers.1.ffn.experts.0.w1.weight").dtype == "I8"           # packed FP4
    head = ckpt.array("head.weight")
    used = np.flatnonzero(np.abs(head).sum(1))
    assert 100 < len(used) < 5000                                   # only the corpus' rows are trained
    assert demo.tokenizer.encode("82")[0] in used and demo.tokenizer.eos_id in used


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_answers(demo, grader, mode):
    r = grader.eval_answers(demo, grader.problems(N, SEED), mode)
    assert r["accuracy"] >= 0.9, r["samples"]
    if mode == "thinking":
        assert r["think_closed"] >= 0.9


def test_tool_path(demo, grader):
    r = grader.eval_tools(demo, grader.problems(N, SEED + 1))
    assert r["call_accuracy"] >= 0.9 and r["accuracy"] >= 0.9, r["samples"]


def test_mtp_drafts_are_accepted(demo, grader):
    """The MTP block was trained: its t+2 guesses mostly match the greedy continuation."""
    tok = demo.tokenizer
    probs = grader.problems(6, SEED + 2)
    prompts = [tok.encode_messages([{"role": "user", "content": q}], thinking_mode="thinking") for *_, q in probs]
    outs, _ = grader._complete(demo, prompts, 64)
    r = grader.mtp_direct(demo, [p + o for p, o in zip(prompts, outs)], [len(p) for p in prompts])
    assert r["positions"] > 50 and r["k1"] > 0.5


def test_greedy_agrees_across_backends(demo, grader, onnx_export):
    """The same greedy answers on every installed backend, an ONNX export included (the trained model's
    distributions are peaked, so agreement is expected token for token)."""
    tok = demo.tokenizer
    probs = grader.problems(4, SEED + 3)
    prompts = [tok.encode_messages([{"role": "user", "content": q}], thinking_mode="thinking") for *_, q in probs]
    want, _ = grader._complete(demo, prompts, 48)
    for backend in ("mlx", "cuda", "onnx"):
        try:
            path = onnx_export(demo.path, 1024) if backend == "onnx" else "demo"
            other = dsv4.load(path, backend=backend, context=1024)
        except (dsv4.BackendError, ImportError):                    # not installed here
            continue
        if backend != "onnx":
            assert other.runner.live_head is not None               # the zero head rows are skipped
        got, _ = grader._complete(other, prompts, 48)
        assert got == want, backend


def test_an_export_of_a_head_with_zero_rows_gives_the_reference_logits(demo, onnx_export):
    """The export multiplies only the live head rows (a Gather of them, then ScatterElements among
    zeros): its logits are the reference's, exact zeros at the other ids."""
    ids = np.asarray(demo.tokenizer.encode("What is 37 + 45?"))
    model = dsv4.load(onnx_export(demo.path, 1024), backend="onnx", context=1024)
    got, want = model.forward(ids), demo.forward(ids)
    dead = np.setdiff1d(np.arange(got.shape[-1]), demo.draft_vocab)
    assert np.all(got[:, dead] == 0) and np.abs(want).max() > 1.0
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("backend", ["reference", "mlx", "cuda"])
def test_drafts_over_the_demo_vocabulary_on_every_backend(demo, grader, backend):
    """The demo drafts over its trained rows only (`draft_vocab`), by default: the same greedy tokens as
    plain decoding, and the trained MTP block's drafts are mostly kept."""
    try:
        m = demo if backend == "reference" else dsv4.load("demo", backend=backend, context=1024)
    except dsv4.BackendError:
        pytest.skip(f"{backend} is not installed here")
    assert 100 < len(m.draft_vocab) < 5000 and m.default_draft_tokens == 2
    tok = m.tokenizer
    prompt = tok.encode_messages([{"role": "user", "content": grader.problems(1, SEED + 4)[0][3]}],
                                 thinking_mode="thinking")
    want = m.generate(prompt, max_tokens=40, draft_tokens=0)
    got = m.generate(prompt, max_tokens=40)
    assert got.tokens == want.tokens
    assert got.drafted > 10 and got.accepted >= 0.6 * got.drafted

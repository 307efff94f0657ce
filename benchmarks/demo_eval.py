"""Evaluate the shipped demo model on fresh arithmetic problems, per backend and dtype.

    python benchmarks/demo_eval.py [--model demo] [--n 100] [--n-other 40] [--runs reference:float32,...]

For each run (backend:dtype, in the default state format: entries as computed, since the demo's entries do
not tile the deploy format's blocks; `onnx` runs
an ONNX export of the checkpoint made here, quantized weights for float32 and dense bfloat16 weights for
bfloat16) and fresh problems drawn with `--seed` (not the training
seed, so the draws and phrasings are new; the problem space itself is the training task's):

* chat: greedy answer in chat mode, right when its last integer is the result;
* thinking: greedy in thinking mode, right when `</think>` closes the reasoning and the answer's last
  integer is the result;
* tool: with the `calculator` tool offered, right when the reply is one calculator call whose arguments
  name both operands and, after the tool result message, the answer's last integer is the result;
* MTP: on the chat and thinking completions, the fraction of generated positions where the MTP block's
  argmax for token t+2 (`Model.mtp_forward`) is the greedy token there (k=1), and where that holds at
  two consecutive positions (k=2, both drafts of a two-token draft right); and the acceptance rate that
  speculative decoding measures itself (`generate(draft_tokens=k)`, Result.accepted / drafted), with a
  check that it produced the same tokens as plain greedy decoding.

Prints a table and writes benchmarks/results/demo_eval.json.  BLAS threads are pinned to one.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import demo_corpus as corpus  # noqa: E402

import dsv4  # noqa: E402
from dsv4.portable.encoding import ParseError, parse_completion  # noqa: E402
from dsv4.portable.generate import generate, generate_batch  # noqa: E402
from dsv4.portable.runtime import resolve_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def problems(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op, a, b = corpus.sample_problem(rng)
        out.append((op, a, b, corpus.question(rng, op, a, b)))
    return out


def _complete(model, prompts, max_tokens):
    """Greedy completions (token ids, with the end-of-sentence token when it stopped) of several prompts,
    batched, and their finish reasons."""
    res = generate_batch(model, prompts, max_tokens=max_tokens, max_batch=16)
    return [list(r.tokens) for r in res], [r.finish_reason for r in res]


def _parse(text: str, mode: str) -> dict:
    """The parsed reply, or an empty one when it is malformed (graded wrong)."""
    try:
        return parse_completion(text, mode)
    except ParseError:
        return {"content": ""}


def eval_answers(model, probs, mode: str) -> dict:
    tok = model.tokenizer
    prompts = [tok.encode_messages([{"role": "user", "content": q}], thinking_mode=mode) for *_, q in probs]
    outs, reasons = _complete(model, prompts, 64 if mode == "thinking" else 24)
    right, closed, samples = 0, 0, []
    for (op, a, b, q), p, out, why in zip(probs, prompts, outs, reasons):
        text = tok.decode(out)
        msg = _parse(text, mode) if why == "stop" else {"content": ""}
        done = mode == "chat" or "</think>" in text
        ok = why == "stop" and done and corpus.final_number(msg.get("content")) == corpus.solve(op, a, b)
        right += ok
        closed += done
        if len(samples) < 3 or not ok and len(samples) < 8:
            samples.append({"question": q, "completion": text, "ok": bool(ok)})
    n = len(probs)
    out = {"accuracy": right / n, "n": n, "samples": samples,
           "completions": [p + o for p, o in zip(prompts, outs)], "prompt_lengths": [len(p) for p in prompts]}
    if mode == "thinking":
        out["think_closed"] = closed / n
    return out


def eval_tools(model, probs) -> dict:
    tok = model.tokenizer
    tools = corpus.TOOLS
    first = [[{"role": "user", "content": q}] for *_, q in probs]
    outs, reasons = _complete(model, [tok.encode_messages(m, thinking_mode="chat", tools=tools) for m in first], 48)
    called, follow, samples = [], [], []
    for (op, a, b, q), m, out, why in zip(probs, first, outs, reasons):
        text = tok.decode(out)
        calls = (_parse(text, "chat").get("tool_calls") or []) if why == "stop" else []
        ok = (len(calls) == 1 and calls[0]["function"]["name"] == "calculator"
              and corpus.calls_with(calls[0]["function"]["arguments"], a, b))
        called.append(ok)
        if ok:
            follow.append((op, a, b, q, m + [{"role": "assistant", "content": "", "tool_calls": calls},
                                              {"role": "tool", "content": str(corpus.solve(op, a, b))}]))
        elif len(samples) < 5:
            samples.append({"question": q, "completion": text, "ok": False})
    prompts = [tok.encode_messages(m, thinking_mode="chat", tools=tools) for *_, m in follow]
    answers, reasons = _complete(model, prompts, 24) if prompts else ([], [])
    right = 0
    for (op, a, b, q, _), out, why in zip(follow, answers, reasons):
        text = tok.decode(out)
        ok = why == "stop" and corpus.final_number(_parse(text, "chat")["content"]) == corpus.solve(op, a, b)
        right += ok
        if len(samples) < 3 or not ok and len(samples) < 8:
            samples.append({"question": q, "answer_after_tool": text, "ok": bool(ok)})
    n = len(probs)
    return {"accuracy": right / n, "call_accuracy": sum(called) / n, "n": n, "samples": samples}


def mtp_direct(model, sequences, prompt_lengths) -> dict:
    """MTP argmax for t+2 vs the greedy token there, over the generated positions of each sequence."""
    one, two = [], []
    for ids, p in zip(sequences, prompt_lengths):
        ids = np.asarray(ids)
        if len(ids) - p < 2:
            continue
        mtp = model.mtp_forward(ids[:-1], ids[1:]).argmax(-1)          # row i predicts ids[i + 2]
        ok = mtp[:-1] == ids[2:]
        ok = ok[max(p - 2, 0):]                                          # targets in the completion
        one += ok.tolist()
        two += (ok[:-1] & ok[1:]).tolist()
    return {"k1": float(np.mean(one)) if one else None, "k2_both": float(np.mean(two)) if two else None,
            "positions": len(one)}


def mtp_speculative(model, sequences, prompt_lengths, n: int) -> dict:
    """Speculative decoding's own acceptance for k = 1, 2 drafts on the first n prompts, and whether it
    reproduced the greedy tokens."""
    out = {}
    for k in (1, 2):
        drafted = accepted = 0
        same = True
        for ids, p in [(ids, p) for ids, p in zip(sequences, prompt_lengths) if len(ids) > p][:n]:
            r = generate(model, ids[:p], max_tokens=len(ids) - p, draft_tokens=k)
            drafted, accepted = drafted + r.drafted, accepted + r.accepted
            same &= list(r.tokens) == list(ids[p:])
        out[f"k{k}"] = {"acceptance": accepted / drafted if drafted else None, "drafted": drafted,
                        "same_tokens_as_greedy": bool(same)}
    return out


def open_run(path: Path, backend: str, dtype: str, work: Path):
    if backend != "onnx":       # the default state format: the demo's 32 nope dims do not tile the deploy
        return dsv4.load(path, backend=backend, dtype=dtype)    # format's 64-wide FP8 block, so "bf16"
    from dsv4.export.onnx_export import export_onnx
    weights = "quantized" if dtype == "float32" else dtype
    out = work / f"onnx-{weights}"
    if not out.exists():
        export_onnx(path, out, weights=weights, context=1024)
    return dsv4.load(out, backend="onnx", dtype=dtype)


def evaluate(model, n: int, seed: int, spec_n: int) -> dict:
    t0 = time.time()
    chat = eval_answers(model, problems(n, seed), "chat")
    think = eval_answers(model, problems(n, seed + 1), "thinking")
    tool = eval_tools(model, problems(n, seed + 2))
    seqs = chat.pop("completions") + think.pop("completions")
    lens = chat.pop("prompt_lengths") + think.pop("prompt_lengths")
    row = {"chat": chat, "thinking": think, "tool": tool, "mtp": mtp_direct(model, seqs, lens)}
    if spec_n:
        row["speculative"] = mtp_speculative(model, seqs, lens, spec_n)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", type=int, default=100, help="problems per mode on the first run")
    ap.add_argument("--n-other", type=int, default=40, help="problems per mode on the other runs")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--runs", default="reference:float32,reference:bfloat16,mlx:float32,mlx:bfloat16,"
                                      "cuda:float32,cuda:bfloat16,onnx:float32,onnx:bfloat16")
    ap.add_argument("--spec", type=int, default=10, help="prompts for the speculative-decoding check (0: off)")
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_eval.json")
    a = ap.parse_args(argv)
    path = resolve_path(a.model)
    table = {}
    with tempfile.TemporaryDirectory() as work:
        for i, run in enumerate(a.runs.split(",")):
            backend, dtype = run.split(":")
            model = open_run(path, backend, dtype, Path(work))
            table[run] = evaluate(model, a.n if i == 0 else a.n_other, a.seed, a.spec)
            r = table[run]
            spec = r.get("speculative", {})
            print(f"{run:20s} chat {r['chat']['accuracy']:.3f}  thinking {r['thinking']['accuracy']:.3f} "
                  f"(closed {r['thinking']['think_closed']:.3f})  tool {r['tool']['accuracy']:.3f} "
                  f"(call {r['tool']['call_accuracy']:.3f})  mtp k1 {r['mtp']['k1']:.3f} k2 {r['mtp']['k2_both']:.3f}"
                  + "".join(f"  spec {k} {v['acceptance']:.3f}{'' if v['same_tokens_as_greedy'] else ' (DIFFERS)'}"
                            for k, v in spec.items() if v["acceptance"] is not None)
                  + f"  [{r['seconds']} s]", flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)       # after every run: a long one may be cut
            a.out.write_text(json.dumps({"model": str(path), "n_first": a.n, "n_other": a.n_other, "seed": a.seed,
                                         "runs": table}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speculative decoding with the MTP block: acceptance, tokens per verify step and decode speed-up per
backend, measured back to back against plain decoding, next to a cost model.

For each model (the random-weight tiny model; the trained demo when this installation ships it) and
backend, and for k = 0..3 drafts: one greedy generation of --gen tokens after a --prompt-token random
prompt through the engine (`dsv4 bench --draft-tokens`' `measure_drafts`; k = 0 is plain decoding on the
same path: the "random prompt" rows).  The demo is also measured on its task ("task" rows): greedy
answers, each to its end of sentence, to 8 fresh arithmetic questions, half in chat and half in thinking
mode.  A random-weight MTP block keeps ~1/vocab of its drafts, so the random model shows the cost
side only; the "oracle α" rows show the other side on the same model: the MTP block still runs, but its
drafts are replaced by the true greedy continuation, kept with probability α per draft (α = 1, 0.6).

Wall-clock rates suffer from other processes on shared cores; the `cpu` columns divide by this
process's CPU time instead (minus a prefill-only run's), which they do not inflate.

Cost model: a round costs one (k+1)-token verify step plus k MTP steps and yields E = (1 − α^(k+1)) /
(1 − α) tokens (drafts accepted independently with probability α), so
    speed-up ≈ E · t_step(1) / (t_step(k+1) + k · t_mtp(1)),
with t_step(S) a main step of S tokens and t_mtp(1) one MTP block step, both timed here in CPU time
(compare with the `cpu` speed-up).

    OPENBLAS_NUM_THREADS=1 python benchmarks/speculative.py [--backends reference,mlx,onnx] [--gen 48] [--reps 3]

Prints a table and writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import demo_corpus as corpus  # noqa: E402

import dsv4  # noqa: E402
from dsv4.cli.bench import counted, measure_drafts  # noqa: E402
from dsv4.portable.tiny import CacheError, ensure_demo, ensure_tiny  # noqa: E402

OUT = Path(__file__).parent / "results" / "speculative.json"
KS = (0, 1, 2, 3)


class OracleDrafts:
    """Replaces the MTP block's logits by the true greedy continuation `seq`, kept with probability
    `alpha` per draft (else a wrong id); the block itself still runs, so its cost is counted."""

    def __init__(self, model, seq, alpha, seed=0):
        self.model, self.seq, self.alpha = model, list(seq), alpha
        self.real = model.mtp_step
        self.rng = np.random.default_rng(seed)

    def __call__(self, state, streams, ids_next):
        start = np.asarray(self.model.runner.ops.to_numpy(state.start)).copy()
        logits, h = self.real(state, streams, ids_next)
        out = np.zeros_like(logits)
        for b in range(logits.shape[0]):
            for s in range(logits.shape[1]):
                i = int(start[b]) + s + 2
                if i < len(self.seq):
                    ok = self.rng.random() < self.alpha
                    out[b, s, self.seq[i] if ok else (self.seq[i] + 1) % (logits.shape[-1] - 3) + 3] = 9.0
        return out, h


def step_times(model, prompt, reps=8) -> dict:
    """t_step(S) for S = 1..4 and t_mtp(1) in CPU seconds, median of `reps`, on forks of one prefilled
    state."""
    state = model.new_state(1)
    _, state, streams = model.step(state, np.asarray([prompt]), with_streams=True)
    mtp = model.new_mtp_state(1)
    model.mtp_step(mtp, streams[:, :-1], np.asarray([prompt[1:]]))
    out = {}
    for s in (1, 2, 3, 4):
        times = []
        for _ in range(reps):
            st = model.fork_state(state)
            t = time.process_time()
            model.step(st, np.asarray([prompt[:s]]))
            times.append(time.process_time() - t)
        out[f"t_step_{s}"] = float(np.median(times))
    times = []
    for _ in range(reps):
        m = model.fork_state(mtp)
        t = time.process_time()
        model.mtp_step(m, streams[:, -1:], np.asarray([[prompt[0]]]))
        times.append(time.process_time() - t)
    out["t_mtp_1"] = float(np.median(times))
    return out


def predicted(times: dict, k: int, alpha: float, backend: str = "") -> float:
    k = min(k, 1) if backend == "onnx" else k          # an export drafts one token per round
    e = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return e * times["t_step_1"] / (times[f"t_step_{k + 1}"] + k * times["t_mtp_1"])


def questions(n: int = 8, seed: int = 2027) -> list:
    """(question, mode) pairs: fresh problems of the demo's task (`tools/demo_corpus.py`, drawn with a
    seed of their own), half asked in chat mode, half in thinking mode (a worked reasoning first)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        op, a, b = corpus.sample_problem(rng)
        out.append((corpus.question(rng, op, a, b), "chat" if i % 2 else "thinking"))
    return out


def measure_questions(model, ks, gen: int, reps: int) -> list:
    """Greedy answers to fresh arithmetic questions (the trained demo's task, `questions`), per k, each
    to its end of sentence: drafted/accepted summed over the questions, decode rates from the summed
    decode times."""
    tok = model.tokenizer
    prompts = [tok.encode_messages([{"role": "user", "content": q}], thinking_mode=mode) for q, mode in questions()]
    for k in ks:
        model.generate(prompts[0], max_tokens=4, draft_tokens=k)                     # warm-up
    sums = {k: [] for k in ks}
    for _ in range(reps):
        for k in ks:
            wall = cpu = 0.0
            drafted = accepted = tokens = steps = 0
            for p in prompts:
                c = time.process_time()
                r, n = counted(model, lambda: model.generate(p, max_tokens=gen, draft_tokens=k))
                cpu += time.process_time() - c
                wall += r.decode_s
                drafted, accepted, tokens = drafted + r.drafted, accepted + r.accepted, tokens + r.completion_tokens - 1
                steps += n - 1                                                  # all but the prefill step
            sums[k].append((wall, cpu, drafted, accepted, tokens, steps))
    rows = []
    for k in ks:
        wall = float(np.median([x[0] for x in sums[k]]))
        cpu = float(np.median([x[1] for x in sums[k]]))
        _, _, drafted, accepted, tokens, steps = sums[k][-1]
        rows.append({"draft_tokens": k, "tokens": tokens, "drafted": drafted, "accepted": accepted,
                     "acceptance": round(accepted / drafted, 4) if drafted else None,
                     "tokens_per_step": round(tokens / steps, 3) if steps else None,
                     "decode_s": round(wall, 4), "decode_tok_s": round(tokens / wall, 2), "cpu_s": round(cpu, 4)})
    base = rows[0]
    for r in rows:
        r["speedup"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
        r["cpu_decode_tok_s"] = round(r["tokens"] / r["cpu_s"], 2)
        r["cpu_speedup"] = round(base["cpu_s"] / r["cpu_s"] * r["tokens"] / base["tokens"], 3)
    return rows


def load(name, path, backend, context):
    if backend == "onnx":
        from dsv4.export import export_onnx
        path = export_onnx(path, tempfile.mkdtemp(prefix=f"spec-{name}-"), context=context)
    return dsv4.load(path, backend=backend, dtype="float32", context=context)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="reference,mlx,onnx")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3, help="runs per k, in turn; the median is kept")
    ap.add_argument("--demo", help="a trained demo checkpoint directory (default: the shipped demo, if any)")
    ap.add_argument("--models", default="tiny,demo")
    args = ap.parse_args()
    models = [("tiny (random)", ensure_tiny("tiny"))] if "tiny" in args.models else []
    if "demo" in args.models:
        try:
            models.append(("demo (trained)", Path(args.demo) if args.demo else ensure_demo()))
        except CacheError as e:
            print(f"no trained demo in this installation: {e}")
    backends = [b for b in args.backends.split(",")
                if b == "reference" or importlib.util.find_spec({"mlx": "mlx", "onnx": "onnxruntime",
                                                                  "cuda": "torch"}[b])]
    rows, context = [], 512
    for name, path in models:
        for backend in backends:
            model = load(name, path, backend, context)
            ids = list(np.random.default_rng(1).integers(3, model.config.vocab_size, args.prompt))
            times = step_times(model, ids)
            measured = [("random prompt", measure_drafts(model, list(KS), args.prompt, args.gen, 256, 0, args.reps))]
            if name.startswith("demo"):
                measured.append(("task", measure_questions(model, list(KS), args.gen, args.reps)))
            for drafts, got in measured:
                for r in got:
                    alpha = r["acceptance"] or 0.0
                    rows.append({"model": name, "backend": backend, "drafts": drafts, **r,
                                 "predicted_speedup": round(predicted(times, r["draft_tokens"], alpha, backend), 3),
                                 **times})
            if name.startswith("tiny"):
                seq = ids + model.generate(ids, max_tokens=args.gen + 8, draft_tokens=0, stop_ids=[]).tokens
                for alpha in (1.0, 0.6):
                    model.mtp_step = OracleDrafts(model, seq, alpha)
                    for r in measure_drafts(model, list(KS), args.prompt, args.gen, 256, 0, args.reps):
                        rows.append({"model": name, "backend": backend, "drafts": f"oracle α={alpha}", **r,
                                     "predicted_speedup": round(predicted(times, r["draft_tokens"], alpha,
                                                                          backend), 3),
                                     **times})
                    del model.mtp_step
    head = f"{'model':15} {'backend':9} {'drafts':14} {'k':>2} {'accept':>7} {'tok/step':>8} {'tok/s':>7} " \
           f"{'speed-up':>8} {'cpu tok/s':>9} {'cpu s-up':>8} {'model':>7}"
    print(head)
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        tps = "-" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        print(f"{r['model']:15} {r['backend']:9} {r['drafts']:14} {r['draft_tokens']:>2} {acc:>7} {tps:>8} "
              f"{r['decode_tok_s']:>7.1f} {r['speedup']:>7.2f}× {r['cpu_decode_tok_s']:>9.1f} "
              f"{r['cpu_speedup']:>7.2f}× {r['predicted_speedup']:>6.2f}×")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if OUT.exists() and len(models) == 1:          # one model measured: keep the other's rows
        rows = [r for r in json.loads(OUT.read_text())["rows"] if r["model"] != models[0][0]] + rows
    OUT.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                               "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                               "prompt_tokens": args.prompt, "gen_tokens": args.gen, "rows": rows}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""`dsv4 bench`: prefill and decode throughput of one backend on random token ids.

A short warm-up (one chunk and one decode step) runs first, so one-time costs (lazy weight decoding,
graph compilation) are not counted.  Prefill is timed over `--prompt-tokens` in chunks of
`--prefill-chunk`; decode over `--gen-tokens` single-token greedy steps.  Peak RSS is the process's
high-water mark (it includes the model's mapped weights that were touched).

`--draft-tokens 0,1,2,3` adds speculative decoding (`portable.speculative`): for each k, one greedy
generation of `--gen-tokens` tokens through the engine (k = 0 is plain decoding on the same path, the
baseline), reporting drafted and accepted tokens, the acceptance rate, tokens per verify step and decode
tok/s with the speed-up over k = 0.  Each k runs a warm-up generation first (compiled verify steps).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from ..portable.engine import prefill
from . import options as opt
from .console import console
from .errors import EXIT_USAGE, CliError
from .resolve import load_model
from .session import peak_rss_bytes


def measure(model, prompt_tokens: int, gen_tokens: int, chunk: int, seed: int) -> dict:
    vocab = model.config.vocab_size
    ids = np.random.default_rng(seed).integers(3, vocab, prompt_tokens + 1)
    warm = model.new_state(1)
    _, warm = model.step(warm, ids[None, :min(chunk, prompt_tokens)])
    model.step(warm, ids[None, :1])

    t0 = time.perf_counter()
    logits, state = prefill(model, model.new_state(1), ids[:prompt_tokens], chunk)
    prefill_s = time.perf_counter() - t0

    tok = int(np.argmax(logits))
    t1 = time.perf_counter()
    for _ in range(gen_tokens):
        logits, state = model.step(state, np.asarray([[tok]], dtype=np.int64))
        tok = int(np.argmax(logits[0, -1]))
    decode_s = time.perf_counter() - t1
    held = model.state_info(state)
    return {"backend": model.backend, "dtype": model.dtype, "model": str(model.path),
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "prefill_chunk": chunk,
            "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
            "prefill_tok_s": round(prompt_tokens / prefill_s, 2), "decode_tok_s": round(gen_tokens / decode_s, 2),
            "ms_per_token": round(1000 * decode_s / gen_tokens, 2), "peak_rss_bytes": peak_rss_bytes(),
            "context": model.context, "state_tokens": held["tokens"], "state_capacity": held["capacity"],
            "state_bytes": held["bytes"]}


def parse_draft_list(text: str | None) -> list[int]:
    """`--draft-tokens 0,1,2,3` → [0, 1, 2, 3] (each in 0..MAX_DRAFT); None → []."""
    from ..portable.speculative import MAX_DRAFT
    if text is None:
        return []
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        raise CliError(f"--draft-tokens must be comma-separated integers such as 0,1,2,3, got {text!r}",
                       EXIT_USAGE) from None
    bad = [k for k in ks if not 0 <= k <= MAX_DRAFT]
    if bad:
        raise CliError(f"--draft-tokens values must be in 0..{MAX_DRAFT}, got {bad[0]}", EXIT_USAGE)
    return ks


def counted(model, run):
    """(run(), the main model steps it took): a verify step is one step however many tokens it keeps."""
    calls, real = [0], model.step

    def step(*args, **kw):
        calls[0] += 1
        return real(*args, **kw)
    model.step = step
    try:
        return run(), calls[0]
    finally:
        del model.step


def measure_drafts(model, ks: list, prompt_tokens: int, gen_tokens: int, chunk: int, seed: int,
                   reps: int = 1) -> list:
    """One row per k (module docstring); k = 0 is always measured, as the baseline.  With `reps` > 1
    the ks are run in turn `reps` times (so a slow spell of the machine hits all of them) and the
    median decode time is kept.  `cpu_*`: the same from the process's CPU time (minus a prefill-only
    run's), which other processes sharing the cores do not inflate."""
    ids = np.random.default_rng(seed + 1).integers(3, model.config.vocab_size, prompt_tokens)
    order = sorted(set(ks) | {0})
    for k in order:
        model.generate(ids[:8], max_tokens=4, draft_tokens=k, stop_ids=[], prefill_chunk=chunk)   # warm-up
    runs: dict = {k: [] for k in order}
    cpu: dict = {k: [] for k in order}
    steps: dict = {}
    for _ in range(reps):
        c = time.process_time()
        model.generate(ids, max_tokens=1, draft_tokens=0, stop_ids=[], prefill_chunk=chunk)
        prefill_cpu = time.process_time() - c
        for k in order:
            c = time.process_time()
            res, n = counted(model, lambda: model.generate(ids, max_tokens=gen_tokens, draft_tokens=k,
                                                           stop_ids=[], prefill_chunk=chunk))
            cpu[k].append(time.process_time() - c - prefill_cpu)
            runs[k].append(res)
            steps[k] = n - -(-prompt_tokens // chunk)                  # decode steps: all but the prefill
    rows, base, cpu_base = [], None, None
    for k in order:
        res = runs[k][-1]
        decode_s = float(np.median([r.decode_s for r in runs[k]]))
        after_first = max(res.completion_tokens - 1, 0)
        rate = after_first / decode_s if decode_s > 0 else 0.0
        base = rate if k == 0 else base
        cpu_s = float(np.median(cpu[k]))
        cpu_rate = after_first / cpu_s if cpu_s > 0 else 0.0
        cpu_base = cpu_rate if k == 0 else cpu_base
        rows.append({"draft_tokens": k, "tokens": res.completion_tokens, "drafted": res.drafted,
                     "accepted": res.accepted,
                     "acceptance": None if res.acceptance_rate is None else round(res.acceptance_rate, 4),
                     "tokens_per_step": round(after_first / steps[k], 3) if steps[k] else None,
                     "decode_s": round(decode_s, 4), "decode_tok_s": round(rate, 2),
                     "speedup": round(rate / base, 3) if base else None,
                     "cpu_decode_tok_s": round(cpu_rate, 2),
                     "cpu_speedup": round(cpu_rate / cpu_base, 3) if cpu_base else None})
    return [r for r in rows if r["draft_tokens"] in ks]


def bench(
    model: opt.Model = None, backend: opt.Backend = "auto", dtype: opt.Dtype = "auto",
    context: opt.Context = None, force: opt.Force = False, parallel: opt.Parallel = None, threads: opt.Threads = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", help="Tokens to prefill.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", help="Tokens to decode.")] = 64,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="Prefill chunk length.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random token ids.")] = 0,
    draft_tokens: Annotated[Optional[str], typer.Option(
        "--draft-tokens", help="Also measure speculative decoding with these draft counts, e.g. 0,1,2,3.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Prefill and decode tokens per second (and peak memory) of one backend."""
    ks = parse_draft_list(draft_tokens)
    for flag, v in (("--prompt-tokens", prompt_tokens), ("--gen-tokens", gen_tokens),
                    ("--prefill-chunk", prefill_chunk)):
        opt.check_positive(flag, v)
    need = prompt_tokens + gen_tokens + 1
    if context is not None and context < need:
        raise CliError(f"--context {context} is too small for {prompt_tokens} + {gen_tokens} tokens", EXIT_USAGE)
    m = load_model(model, backend, dtype, context or None, force, quiet=json_out, parallel=parallel,
                   threads=threads)
    m.check_length(need)
    opt.check_draft_tokens(max(ks, default=0), m)
    result = measure(m, prompt_tokens, gen_tokens, prefill_chunk, seed)
    if ks:
        result["speculative"] = measure_drafts(m, ks, prompt_tokens, gen_tokens, prefill_chunk, seed)
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    t = Table(title=f"{m.path.name} on {m.backend}/{m.dtype}", title_justify="left")
    for col in ("phase", "tokens", "seconds", "tok/s"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    t.add_row("prefill", str(prompt_tokens), f"{result['prefill_s']:.3f}", f"{result['prefill_tok_s']:.1f}")
    t.add_row("decode", str(gen_tokens), f"{result['decode_s']:.3f}", f"{result['decode_tok_s']:.1f}")
    out = console()
    out.print(t)
    out.print(f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB · {result['ms_per_token']:.1f} ms/token · "
              f"state {result['state_bytes'] / 2**20:.1f} MiB for {result['state_tokens']} tokens "
              f"(capacity {result['state_capacity']}, context limit {result['context']})")
    if ks:
        t = Table(title="speculative decoding (greedy, MTP drafts)", title_justify="left")
        for col in ("k", "drafted", "accepted", "acceptance", "tok/step", "tok/s", "speed-up"):
            t.add_column(col, justify="right")
        for r in result["speculative"]:
            t.add_row(str(r["draft_tokens"]), str(r["drafted"]), str(r["accepted"]),
                      "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                      "-" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}",
                      f"{r['decode_tok_s']:.1f}", "-" if r["speedup"] is None else f"{r['speedup']:.2f}×")
        out.print(t)

"""`dsv4 bench`: prefill and decode throughput of one backend on random token ids.

A short warm-up (one chunk and one decode step) runs first, so one-time costs (lazy weight decoding,
graph compilation) are not counted.  Prefill is timed over `--prompt-tokens` in chunks of
`--prefill-chunk`; decode over `--gen-tokens` single-token greedy steps.  Peak RSS is the process's
high-water mark (it includes the model's mapped weights that were touched).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

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


def bench(
    model: opt.Model = None, backend: opt.Backend = "auto", dtype: opt.Dtype = "auto",
    context: opt.Context = None, force: opt.Force = False,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", help="Tokens to prefill.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", help="Tokens to decode.")] = 64,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="Prefill chunk length.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random token ids.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Prefill and decode tokens per second (and peak memory) of one backend."""
    for flag, v in (("--prompt-tokens", prompt_tokens), ("--gen-tokens", gen_tokens),
                    ("--prefill-chunk", prefill_chunk)):
        opt.check_positive(flag, v)
    need = prompt_tokens + gen_tokens + 1
    if context is not None and context < need:
        raise CliError(f"--context {context} is too small for {prompt_tokens} + {gen_tokens} tokens", EXIT_USAGE)
    m = load_model(model, backend, dtype, context or None, force, quiet=json_out)
    m.check_length(need)
    result = measure(m, prompt_tokens, gen_tokens, prefill_chunk, seed)
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

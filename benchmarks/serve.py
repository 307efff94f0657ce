"""Serving under load: throughput, time to first token and inter-token latency at 1, 4 and 16 streams.

Each backend gets its own `dsv4 serve` process on the demo model (BLAS threads pinned), driven by the
real `openai` client over HTTP, so the figures include everything a user's request pays: JSON, SSE,
the scheduler's batching, tokenizing and detokenizing.  Three tables:

1. load — per concurrency c: c clients each send `--rounds` streaming chat requests back to back (fresh
   prompts, so the prefix cache never helps; greedy; `--max-tokens` each).  Throughput is completion
   tokens over wall time; TTFT and ITL percentiles are over every request / every gap between chunks.
2. constrained — the same at concurrency 1 with `response_format: json_schema` against plain requests:
   the extra milliseconds of the decode gap are the constraint's per-token cost (mask computation and
   its application), the extra TTFT its grammar's compilation.
3. prompt cache — a long prompt sent to a server with `--prompt-cache-dir`, the server restarted, and the
   same prompt sent again: TTFT cold vs after the restart, and the cached tokens the usage reports.

Why not an in-process benchmark: the number users feel is the HTTP one; the in-process engine cost is
what `dsv4 bench` reports.

    python benchmarks/serve.py [--backends reference,mlx] [--threads 1] [--max-tokens 32] [--quick]
Prints the tables and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "serve.json"
WORDS = ("river stone quiet lantern maple orbit copper meadow signal harbor velvet summit ember "
         "glacier thistle prism canyon willow beacon saffron").split()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["name", "count"], "additionalProperties": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(backend: str, threads: int, *extra: str):
    """A `dsv4 serve` process on the demo model; yields its base URL once /health answers."""
    port = free_port()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dsv4", "serve", "--backend", backend, "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"dsv4 serve --backend {backend} exited: {proc.stderr.read().strip()[-400:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit(f"dsv4 serve --backend {backend} did not answer /health in 300 s")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_stream(client, text: str, max_tokens: int, **extra) -> dict:
    """One streaming request: TTFT, the gaps between content chunks, and the usage it reports."""
    t0 = time.perf_counter()
    stamps, usage = [], None
    stream = await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and (chunk.choices[0].delta.content or
                              getattr(chunk.choices[0].delta, "reasoning_content", None)):
            stamps.append(time.perf_counter())
    done = time.perf_counter()
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", 0) or 0
    return {"ttft": (stamps[0] if stamps else done) - t0, "gaps": list(np.diff(stamps)),
            "tokens": usage.completion_tokens if usage else len(stamps), "cached": cached, "wall": done - t0}


async def load(url: str, concurrency: int, rounds: int, max_tokens: int, seed: int, **extra) -> dict:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    rng = random.Random(seed)
    prompts = [[prompt(rng, 24) for _ in range(rounds)] for _ in range(concurrency)]

    async def worker(mine):
        return [await one_stream(client, p, max_tokens, **extra) for p in mine]

    t0 = time.perf_counter()
    runs = [r for rs in await asyncio.gather(*(worker(p) for p in prompts)) for r in rs]
    wall = time.perf_counter() - t0
    await client.close()
    ttft = np.array([r["ttft"] for r in runs]) * 1e3
    gaps = np.array([g for r in runs for g in r["gaps"]] or [0.0]) * 1e3
    tokens = sum(r["tokens"] for r in runs)
    return {"concurrency": concurrency, "requests": len(runs), "completion_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_ms_p50": float(np.percentile(ttft, 50)),
            "ttft_ms_p90": float(np.percentile(ttft, 90)), "itl_ms_p50": float(np.percentile(gaps, 50)),
            "itl_ms_p90": float(np.percentile(gaps, 90)), "ms_per_token": 1e3 * wall / max(tokens, 1)}


def constrained(url: str, rounds: int, max_tokens: int) -> dict:
    """Plain vs `json_schema` requests at concurrency 1.  The decode gap (ITL) is the per-token cost; the
    TTFT difference is the grammar's compilation.  (Wall time per token would mislead: a JSON answer
    ends when its grammar does, so it amortizes the prefill over fewer tokens.)"""
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}
    plain = asyncio.run(load(url, 1, rounds, max_tokens, seed=7))
    forced = asyncio.run(load(url, 1, rounds, max_tokens, seed=7, response_format=fmt))
    return {"plain_itl_ms_p50": plain["itl_ms_p50"], "constrained_itl_ms_p50": forced["itl_ms_p50"],
            "extra_ms_per_token": forced["itl_ms_p50"] - plain["itl_ms_p50"],
            "plain_ttft_ms_p50": plain["ttft_ms_p50"], "constrained_ttft_ms_p50": forced["ttft_ms_p50"],
            "constrained_tokens": forced["completion_tokens"]}


def prompt_cache(backend: str, threads: int, words: int) -> dict:
    """TTFT of one long prompt on a cold server, then again after a restart over the same cache dir."""
    from openai import AsyncOpenAI
    text = prompt(random.Random(11), words)

    async def ask(url):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
        try:
            return await one_stream(client, text, 1)
        finally:
            await client.close()

    cache = Path(tempfile.mkdtemp(prefix="dsv4-serve-bench-"))
    try:
        with server(backend, threads, "--prompt-cache-dir", str(cache)) as url:
            cold = asyncio.run(ask(url))
        with server(backend, threads, "--prompt-cache-dir", str(cache)) as url:
            warm = asyncio.run(ask(url))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"prompt_words": words, "cold_ttft_ms": cold["ttft"] * 1e3, "restarted_ttft_ms": warm["ttft"] * 1e3,
            "cached_tokens_after_restart": warm["cached"], "speedup": cold["ttft"] / max(warm["ttft"], 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="reference,mlx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    ap.add_argument("--quick", action="store_true", help="concurrency 1 and 4 only, one round")
    args = ap.parse_args()
    levels = (1, 4) if args.quick else (1, 4, 16)
    rounds = 1 if args.quick else args.rounds
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": args.threads}, "max_tokens": args.max_tokens, "backends": {}}
    for backend in args.backends.split(","):
        with server(backend, args.threads) as url:
            rows = [asyncio.run(load(url, c, rounds, args.max_tokens, seed=c)) for c in levels]
            cons = constrained(url, rounds + 1, args.max_tokens)
        cache = prompt_cache(backend, args.threads, words=600 if args.quick else 1500)
        out["backends"][backend] = {"load": rows, "constrained": cons, "prompt_cache": cache}

        print(f"\n## {backend} (demo model, {args.threads} BLAS thread(s), {args.max_tokens} tokens per request)")
        print("| streams | requests | tok/s | TTFT p50 / p90 ms | ITL p50 / p90 ms |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_ms_p50']:.0f} / "
                  f"{r['ttft_ms_p90']:.0f} | {r['itl_ms_p50']:.1f} / {r['itl_ms_p90']:.1f} |")
        print(f"constrained (json_schema): decode gap p50 {cons['constrained_itl_ms_p50']:.1f} ms vs plain "
              f"{cons['plain_itl_ms_p50']:.1f} ({cons['extra_ms_per_token']:+.2f} ms/token); TTFT p50 "
              f"{cons['constrained_ttft_ms_p50']:.0f} vs {cons['plain_ttft_ms_p50']:.0f} ms")
        print(f"prompt cache: {cache['prompt_words']}-word prompt TTFT cold {cache['cold_ttft_ms']:.0f} ms, after a "
              f"restart {cache['restarted_ttft_ms']:.0f} ms ({cache['speedup']:.1f}x; "
              f"{cache['cached_tokens_after_restart']} cached tokens reported)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()

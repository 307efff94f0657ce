"""Long context at the cost of the text: decode and prefill cost against the tokens held, next to a cost model.

Four tables (model: the tiny checkpoint with max_position_embeddings raised to 1M, so any context loads):
1. context sweep — decode ms/token for the same 256-token text loaded with context 4K, 128K and 1M, per
   backend, each in its own process (peak RSS is per process); the ratios 1M/4K are the numbers to watch.
2. held sweep — decode ms/token with 1K, 16K and 64K tokens held (reference, mlx), beside the cost model.
   The held state is synthetic (random rows, `start` = n): decode cost does not depend on the values.
3. prefill — one 512-token chunk at position p (synthetic state) for p = 1K, 4K, 16K, 64K beside the cost
   model; whole prompts of 1K/4K/16K tokens; and a 16K prompt at context 16K vs 1M.
4. state bytes held after 4K and 64K tokens vs `cache.state_bytes` (bf16 and deploy), and the bytes a
   decode step writes (buffers diffed around one step) vs the rows it must write.

Cost model (per step of S tokens at position p, from the config): weight FLOPs 2·active·S and weight bytes
(float32 dense, what the reference multiplies); per CSA layer the indexer's 2·S·nh·c·p/4 FLOPs over the
p/4 keys it reads; per layer attention 4·S·H·d·(W + k or p/128).  Time = Σ max(FLOPs / GEMM rate,
bytes / copy bandwidth), with both rates measured in this run.  BLAS threads are pinned (default 1).

    python benchmarks/long_context.py [--backends reference,mlx,cuda,onnx] [--threads 1] [--quick]
Prints the tables and writes benchmarks/results/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dsv4.portable import quant

K = 1024
OUT = Path(__file__).parent / "results" / "long_context.json"


# ---------------------------------------------------------------------- the model and machine rates
def long_tiny() -> Path:
    """The tiny checkpoint, with a config that allows a 1M context (weights shared by hard links/copies)."""
    from dsv4.portable.tiny import cache_dir, ensure_tiny
    src = ensure_tiny("tiny")
    dst = cache_dir() / f"{src.name}-1m"
    if not (dst / "config.json").exists():
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name != "config.json" and not (dst / f.name).exists():
                try:
                    os.link(f, dst / f.name)
                except OSError:
                    (dst / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1 << 20}, indent=2))
    return dst


def work_rates() -> dict:
    """float32 GEMM FLOP/s and copy bandwidth (bytes read + written per second) on this machine now,
    measured in a worker so the BLAS thread pin applies."""
    a = np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    np.matmul(a, b)
    t = time.perf_counter()
    for _ in range(10):
        np.matmul(a, b)
    gemm = 10 * 2 * 512 * 1024 * 1024 / (time.perf_counter() - t)
    src = np.ones(64 << 20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, src)
    bw = 5 * 2 * src.nbytes / (time.perf_counter() - t)
    return {"gemm_flop_s": gemm, "copy_bytes_s": bw}


def cost_model(cfg, s: int, p: int, rates: dict, weight_bytes_per_param: int = 4) -> float:
    """Seconds a step of s tokens at position p must take (module docstring)."""
    gemm, bw = rates["gemm_flop_s"], rates["copy_bytes_s"]
    active = cfg.param_counts()["active"] - cfg.vocab_size * cfg.hidden_size      # embedding is a lookup
    t = max(2 * active * s / gemm, active * weight_bytes_per_param / bw)
    h, d, w = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    for layer in range(cfg.num_hidden_layers):
        m = cfg.ratio(layer)
        n = (p + s) // m if m else 0
        if cfg.is_csa(layer):
            nh, c = cfg.index_n_heads, cfg.index_head_dim
            t += max(2 * s * nh * c * n / gemm, n * c * 4 / bw)
            seen = w + min(cfg.index_topk, n)
        else:
            seen = w + n
        t += max(4 * s * h * d * seen / gemm, seen * d * 4 / bw)
    return t


# ---------------------------------------------------------------------- measurements (run in a worker)
def _load(backend: str, context: int, dtype: str = "float32", fmt: str | None = None):
    import dsv4
    path = long_tiny()
    if backend == "onnx":
        from dsv4.export import export_onnx
        from dsv4.export.manifest import VERSION
        from dsv4.portable.tiny import cache_dir
        out = cache_dir() / "tiny-1m-onnx"
        manifest = out / "manifest.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != VERSION:
            export_onnx(path, out, context=1 << 20, overwrite=True)
        path = out
    return dsv4.load(path, backend=backend, dtype=dtype, context=context, state_format=fmt)


def _timed_decode(model, state, tok: int, n: int) -> float:
    model.step(state, np.asarray([[tok]]))                       # warm (compiles, caches)
    t = time.perf_counter()
    for _ in range(n):
        model.step(state, np.asarray([[tok]]))
    return (time.perf_counter() - t) / n


def synthetic_state(model, held: int, room: int):
    """A state holding `held` tokens of random rows (room for `room` more); same shapes as a real one."""
    o, runner = model.runner.ops, model.runner
    state = model.new_state(1)
    state.reserve(o, held + room, runner.limit)
    rng = np.random.default_rng(0)
    for name, buf in list(state.items()):
        if name == "start":
            state.buffers[name] = o.asarray(np.asarray([held]), "int")
            continue
        shape = tuple(buf.shape)
        if str(buf.dtype).endswith("uint8"):                      # FP8/FP4 codes and E8M0 scales ≤ 2^-1
            vals = rng.integers(0, 0x7E, shape).astype(np.uint8)
        elif str(buf.dtype).endswith("uint16"):                   # the reference's bf16 words
            vals = quant.f32_to_bf16((rng.standard_normal(shape) * 0.5).astype(np.float32))
        else:
            vals = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        state.buffers[name] = _like(o.asarray(vals) if vals.dtype == np.float32 else vals, buf)
    return state


def _like(arr, buf):
    """`arr` in the array type and dtype of the backend buffer `buf` (numpy, mlx or torch)."""
    if isinstance(buf, np.ndarray):
        return np.asarray(arr).astype(buf.dtype)
    if hasattr(buf, "to"):                                         # torch
        import torch
        return torch.as_tensor(np.asarray(arr)).to(device=buf.device, dtype=buf.dtype)
    import mlx.core as mx
    return mx.array(np.asarray(arr)).astype(buf.dtype)


def work_context(backend: str, context: int, text: int, decode: int) -> dict:
    model = _load(backend, context)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, text)
    state = model.new_state(1)
    model.step(state, ids[None])
    ms = 1e3 * _timed_decode(model, state, int(ids[-1]), decode)
    return {"backend": backend, "context": context, "text": text, "decode_ms": ms,
            "peak_rss": _peak_rss(), **{f"state_{k}": v for k, v in model.state_info(state).items()}}


def work_held(backend: str, held: int, decode: int) -> dict:
    model = _load(backend, 1 << 20)
    state = synthetic_state(model, held, decode + 2)
    return {"backend": backend, "held": held, "decode_ms": 1e3 * _timed_decode(model, state, 5, decode)}


def work_prefill(backend: str, position: int, chunk: int) -> dict:
    model = _load(backend, 1 << 20)
    ids = np.random.default_rng(1).integers(3, model.config.vocab_size, chunk)
    state = synthetic_state(model, position, 2 * chunk)
    model.step(state, ids[None, :chunk])                          # warm at the same shapes
    state = synthetic_state(model, position, 2 * chunk)
    t = time.perf_counter()
    model.step(state, ids[None])
    return {"backend": backend, "position": position, "chunk": chunk, "seconds": time.perf_counter() - t}


def work_prompt(backend: str, context: int, tokens: int, chunk: int) -> dict:
    model = _load(backend, context)
    ids = np.random.default_rng(2).integers(3, model.config.vocab_size, tokens)
    model.forward(ids[:16])
    state = model.new_state(1)
    t = time.perf_counter()
    for a in range(0, tokens, chunk):
        model.step(state, ids[None, a:a + chunk])
    s = time.perf_counter() - t
    return {"backend": backend, "context": context, "tokens": tokens, "seconds": s, "tok_s": tokens / s}


def work_bytes(backend: str, tokens: int, dtype: str, fmt: str) -> dict:
    """State bytes held with `tokens` tokens, and the bytes one decode step writes (buffers diffed)."""
    from dsv4.portable.cache import state_bytes
    model = _load(backend, 1 << 20, dtype, fmt)
    state = synthetic_state(model, tokens - 1, 2)
    model.step(state, np.asarray([[7]]))                          # a real row at position tokens − 1
    info = model.state_info(state)
    before = model.runner.state_to_numpy(state)
    model.step(state, np.asarray([[9]]))
    after = model.runner.state_to_numpy(state)
    written = 0
    for k, v in after.items():
        if k == "start":
            continue
        raw = state[k]
        row_bytes = raw.nbytes // (raw.shape[0] * raw.shape[1])
        rows = (before[k] != v).reshape(v.shape[0], v.shape[1], -1).any(-1)[:, :-1].sum()   # spill excluded
        written += int(rows) * row_bytes
    return {"backend": backend, "dtype": dtype, "format": fmt, "tokens": tokens, "bytes_held": info["bytes"],
            "capacity": info["capacity"], "predicted": state_bytes(model.config, tokens, fmt),
            "predicted_at_capacity": state_bytes(model.config, info["capacity"], fmt),
            "written_per_step": written}


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


WORK = {"rates": work_rates, "context": work_context, "held": work_held, "prefill": work_prefill, "prompt": work_prompt,
        "bytes": work_bytes}


def run(kind: str, threads: int, **kw) -> dict:
    """One measurement in a fresh process (threads pinned), so peak RSS and caches are its own."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", json.dumps({"kind": kind, **kw})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1], **kw}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- tables
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="reference,mlx,cuda,onnx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer decode steps, no 64K rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        spec = json.loads(a.worker)
        print(json.dumps(WORK[spec.pop("kind")](**spec)))
        return
    os.environ["OPENBLAS_NUM_THREADS"] = str(a.threads)
    from dsv4.portable.config import ModelConfig
    backends = [b for b in a.backends.split(",") if b]
    decode = 8 if a.quick else 24
    big = [1 * K, 16 * K] + ([] if a.quick else [64 * K])
    cfg = ModelConfig.from_file(long_tiny())
    rates = run("rates", a.threads)
    res = {"machine": platform.machine(), "processor": platform.processor(), "threads": a.threads,
           "rates": rates, "context": [], "held": [], "prefill_chunk": [], "prompt": [], "bytes": []}
    print(f"GEMM {rates['gemm_flop_s'] / 1e9:.1f} GFLOP/s · copy {rates['copy_bytes_s'] / 1e9:.1f} GB/s "
          f"· {a.threads} BLAS thread(s)")

    print("\n1. decode ms/token, 256-token text, by loaded context (best of 3 interleaved runs)")
    print(f"{'backend':<10} {'4K':>8} {'128K':>8} {'1M':>8} {'1M/4K':>7} {'RSS 1M/4K':>10} {'state MiB':>10}")
    for b in backends:
        rounds = [[run("context", a.threads, backend=b, context=c, text=256, decode=decode)
                   for c in (4 * K, 128 * K, 1 << 20)] for _ in range(1 if a.quick else 3)]
        res["context"] += [r for rnd in rounds for r in rnd]
        rows = [min(col, key=lambda r: r.get("decode_ms", float("inf"))) for col in zip(*rounds)]
        if any("error" in r for r in rows):
            print(f"{b:<10} error: {next(r['error'] for r in rows if 'error' in r)}")
            continue
        ms = [r["decode_ms"] for r in rows]
        print(f"{b:<10} {ms[0]:>8.1f} {ms[1]:>8.1f} {ms[2]:>8.1f} {ms[2] / ms[0]:>7.2f} "
              f"{rows[2]['peak_rss'] / rows[0]['peak_rss']:>10.2f} {rows[2]['state_bytes'] / 2**20:>10.2f}")

    print("\n2. decode ms/token by tokens held (context 1M) vs cost model")
    print(f"{'backend':<10} {'held':>6} {'ms':>8} {'model ms':>9} {'Δms vs 1K':>10} {'Δmodel':>8}")
    for b in [b for b in backends if b in ("reference", "mlx")]:
        rows = [run("held", a.threads, backend=b, held=n, decode=decode) for n in big]
        res["held"] += rows
        base = None
        for r in rows:
            if "error" in r:
                print(f"{b:<10} {r['held']:>6} error: {r['error']}")
                continue
            r["model_ms"] = 1e3 * cost_model(cfg, 1, r["held"], rates)
            base = base or r
            print(f"{b:<10} {r['held'] // K:>5}K {r['decode_ms']:>8.2f} {r['model_ms']:>9.3f} "
                  f"{r['decode_ms'] - base['decode_ms']:>10.2f} {r['model_ms'] - base['model_ms']:>8.3f}")

    print("\n3a. one 512-token prefill chunk at position p vs cost model")
    print(f"{'backend':<10} {'p':>6} {'tok/s':>8} {'model tok/s':>12} {'model/measured':>15}")
    for b in [b for b in backends if b in ("reference", "mlx")]:
        for p in [1 * K, 4 * K] + big[1:]:
            r = run("prefill", a.threads, backend=b, position=p, chunk=512)
            res["prefill_chunk"].append(r)
            if "error" in r:
                print(f"{b:<10} {p // K:>5}K error: {r['error']}")
                continue
            r["model_s"] = cost_model(cfg, 512, p, rates)
            print(f"{b:<10} {p // K:>5}K {512 / r['seconds']:>8.0f} {512 / r['model_s']:>12.0f} "
                  f"{r['seconds'] / r['model_s']:>15.2f}")

    print("\n3b. whole-prompt prefill tok/s (chunks of 512)")
    prompts = [(1 << 20, n) for n in (1 * K, 4 * K) + (() if a.quick else (16 * K,))]
    prompts += [] if a.quick else [(16 * K, 16 * K)]
    for ctx, n in prompts:
        r = run("prompt", a.threads, backend="reference", context=ctx, tokens=n, chunk=512)
        res["prompt"].append(r)
        if "error" in r:
            print(f"reference  {n // K:>3}K tokens at context {ctx // K}K: error {r['error']}")
            continue
        print(f"reference  {n // K:>3}K tokens at context {ctx // K:>5}K: {r['tok_s']:>7.0f} tok/s ({r['seconds']:.1f} s)")
    same = [r for r in res["prompt"] if r.get("tokens") == 16 * K and "error" not in r]
    if len(same) == 2:
        print(f"16K prompt, context 1M / 16K time: {same[0]['seconds'] / same[1]['seconds']:.2f}")

    print("\n4. state bytes held vs model, and bytes one decode step writes (reference, bfloat16; synthetic rows)")
    print(f"{'format':<7} {'tokens':>6} {'held':>10} {'predicted':>10} {'at capacity':>12} {'written/step':>13}")
    for fmt in ("bf16", "deploy"):
        for n in (4 * K,) + (() if a.quick else (64 * K,)):
            r = run("bytes", a.threads, backend="reference", tokens=n, dtype="bfloat16", fmt=fmt)
            res["bytes"].append(r)
            if "error" in r:
                print(f"{fmt:<7} {n // K:>5}K error: {r['error']}")
                continue
            print(f"{fmt:<7} {n // K:>5}K {r['bytes_held']:>10,} {r['predicted']:>10,} "
                  f"{r['predicted_at_capacity']:>12,} {r['written_per_step']:>13,}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()

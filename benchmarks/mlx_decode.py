"""MLX backend speed: decode and prefill tokens/s, weight bandwidth per decoded token, peak memory.

For each config (the `tiny` preset and a `medium` synthetic one: hidden 2048, 8 layers, 64 experts top-6),
in a fresh subprocess so peak RSS belongs to that model alone:
* decode tok/s: single-token steps at batch 1 after a short prompt;
* prefill tok/s at each length in --prefill (skipped above the model's context);
* bandwidth ratio: bytes of weights one decoded token touches (everything but the embedding table and the
  routed experts, plus one embedding row and top-k/E of the routed banks) ÷ step time, against a copy
  bandwidth measured with MLX on the same device in the same run (target ≥ 0.7 on medium);
* peak RSS ÷ checkpoint bytes (target ≤ 1.1).

Prints a table and writes benchmarks/results/mlx.json.  Never pass/fail.  Example (quick, CPU):
    python benchmarks/mlx_decode.py --configs tiny,medium --medium-inter 256 --prefill 1024 --decode 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "mlx.json"


def medium_config(inter: int):
    from dsv4.portable.config import preset
    return dataclasses.replace(
        preset("tiny"), hidden_size=2048, num_hidden_layers=8, compress_ratios=(0, 4, 128, 4, 128, 4, 128, 0, 0),
        num_attention_heads=16, head_dim=256, q_lora_rank=512, o_groups=4, o_lora_rank=256,
        index_n_heads=16, index_head_dim=128, index_topk=64, n_routed_experts=64, num_experts_per_tok=6,
        moe_intermediate_size=inter, vocab_size=32768, max_position_embeddings=65536)


def checkpoint_dir(name: str, inter: int, root: Path) -> Path:
    from dsv4.portable.config import preset
    from dsv4.portable.tiny import write_checkpoint
    path = root / f"{name}-{inter}" if name == "medium" else root / name
    if not (path / "model.safetensors.index.json").exists():
        cfg = medium_config(inter) if name == "medium" else preset(name)
        write_checkpoint(cfg, path, tokenizer=None, shard_bytes=512 << 20)
    return path


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s of an MLX elementwise copy (read + write of nbytes) on the default device."""
    import mlx.core as mx
    x = mx.zeros((nbytes // 4,), dtype=mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(x + 1.0)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def touched_bytes(model) -> int:
    """Weight bytes one decoded token reads (routed banks counted at top-k/E, embedding at one row)."""
    from dsv4.backends.mlx.qlinear import ExpertBank
    cfg, total = model.config, 0
    for name, v in model.runner.weights._cache.items():
        if isinstance(v, ExpertBank):
            total += sum(q.nbytes for q in (v.w1, v.w2, v.w3)) * cfg.num_experts_per_tok // len(v)
        elif name == "embed.weight":
            total += v.nbytes // v.shape[0]
        else:
            total += v.nbytes
    return total


def measure(path: Path, prefill: list[int], decode: int, dtype: str) -> dict:
    import mlx.core as mx

    import dsv4
    ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    t0 = time.perf_counter()
    m = dsv4.load(path, backend="mlx", dtype=dtype, context=max(prefill + [256]))
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = m.config.vocab_size
    state = m.new_state(1)
    _, state = m.step(state, rng.integers(3, vocab, (1, 32)))
    steps = []
    for _ in range(decode + 2):
        t = time.perf_counter()
        _, state = m.step(state, rng.integers(3, vocab, (1, 1)))
        steps.append(time.perf_counter() - t)
    step_s = float(np.median(steps[2:]))                  # the first steps include any compile
    pre = {}
    for n in prefill:
        if n > m.context:
            continue
        t = time.perf_counter()
        m.step(m.new_state(1), rng.integers(3, vocab, (1, n)))
        pre[str(n)] = n / (time.perf_counter() - t)
    bw = copy_bandwidth()
    touched = touched_bytes(m)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"device": str(mx.default_device()), "dtype": dtype, "compiled_decode": m.runner._decode is not
            m.runner._forward, "checkpoint_bytes": ckpt_bytes, "weight_bytes_held": m.runner.weights.nbytes(),
            "load_s": load_s, "decode_tok_s": 1.0 / step_s, "prefill_tok_s": pre,
            "bytes_per_token": touched, "weight_bw_bytes_s": touched / step_s, "copy_bw_bytes_s": bw,
            "bw_ratio": touched / step_s / bw, "peak_rss_bytes": rss, "rss_ratio": rss / ckpt_bytes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,medium")
    ap.add_argument("--prefill", default="1024,8192,32768")
    ap.add_argument("--decode", type=int, default=32, help="decode steps to time")
    ap.add_argument("--medium-inter", type=int, default=1024, help="expert width of medium (1024 ≈ 1.8 GB)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dsv4-bench"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefill = [int(x) for x in args.prefill.split(",") if x]
    if args.one:
        print(json.dumps(measure(Path(args.one), prefill, args.decode, args.dtype)))
        return
    root = Path(args.cache)
    results = {"machine": platform.platform(), "python": platform.python_version(), "configs": {}}
    for name in args.configs.split(","):
        path = checkpoint_dir(name, args.medium_inter, root)
        out = subprocess.run([sys.executable, __file__, "--one", str(path), "--prefill", args.prefill,
                              "--decode", str(args.decode), "--dtype", args.dtype],
                             capture_output=True, text=True, check=True)
        results["configs"][name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'config':8} {'ckpt MB':>8} {'decode tok/s':>12} {'prefill tok/s':>28} {'bw ratio':>8} {'RSS/ckpt':>8}")
    for name, r in results["configs"].items():
        pre = " ".join(f"{k}:{v:.0f}" for k, v in r["prefill_tok_s"].items())
        print(f"{name:8} {r['checkpoint_bytes'] / 1e6:8.1f} {r['decode_tok_s']:12.2f} {pre:>28} "
              f"{r['bw_ratio']:8.3f} {r['rss_ratio']:8.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

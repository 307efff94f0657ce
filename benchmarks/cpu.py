"""CPU speed: the `cpu` backend (stored-format kernels) on the tiny config and on a medium one (≥ 1 GB in the
official FP8/FP4 layout, written here once), next to the reference and, when given, llama.cpp on the same
checkpoint converted to GGUF, measured back to back.

For each run: prefill tok/s (one `--prompt`-token step), decode tok/s (median step of `--decode`), the
weight bytes one decode token must read (the cost model: every stored linear once, the routed experts
k/E of theirs, the head), the bandwidth that implies against a measured single-copy memcpy rate, the decode
step's time split (fused linear kernels, fused experts, other BLAS products, everything else) and peak RSS
against the checkpoint's bytes.  Each run is its own process (clean peak RSS); BLAS threads are pinned.

    python benchmarks/cpu.py [--threads 2] [--medium DIR] [--gguf medium.gguf --llama-bench PATH]

Prints a table and writes benchmarks/results/cpu.json.  benchmarks/README.md says how to build llama.cpp
and convert the medium checkpoint.
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

MEDIUM = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=8, n_routed_experts=32, num_experts_per_tok=4,
              moe_intermediate_size=1024, compress_ratios=[0, 4, 128, 4, 128, 4, 128, 0], index_topk=64,
              max_position_embeddings=65536, num_attention_heads=16, head_dim=512, q_lora_rank=512, o_groups=4,
              o_lora_rank=512, index_n_heads=16, num_nextn_predict_layers=0)


def medium_checkpoint(path: Path) -> Path:
    """The medium config's synthetic checkpoint (flash defaults but the sizes above; ~1.3 GB), once."""
    from dsv4.portable.config import PRESETS, ModelConfig
    from dsv4.portable.tiny import write_checkpoint
    if not (path / "config.json").exists():
        cfg = ModelConfig.from_dict({**PRESETS["flash"](), **MEDIUM})
        write_checkpoint(cfg, path, shard_bytes=1 << 30)
    return path


def memcpy_gbs(size: int = 512 << 20) -> float:
    a = np.ones(size, np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return size / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes(model) -> int:
    """Weight bytes one decode token reads on the cpu backend: its stored linears once, k/E of each expert
    bank (the embedding: one row, ignored)."""
    from dsv4.backends.cpu.weights import CpuLinear, ExpertBank
    cfg, total = model.config, 0
    for name, value in model.runner.weights._cache.items():
        if isinstance(value, CpuLinear) and name != "embed.weight":
            total += value.codes.nbytes + value.scale.nbytes
        elif isinstance(value, ExpertBank):
            bank = sum(w.codes.nbytes + w.scale.nbytes for w in (value.w1, value.w2, value.w3))
            total += bank * cfg.num_experts_per_tok // len(value)
    return total


def split(model, state, tok, steps: int) -> dict:
    """Decode-step time by where it goes (cProfile's own time of the kernels and of NumPy's matmul)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        model.step(state, tok)
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    parts = {"fused linear kernels": 0.0, "fused experts": 0.0, "BLAS matmul": 0.0}
    for (file, _, fn), v in stats.items():
        if file.endswith("kernels.py") and fn == "linear":
            parts["fused linear kernels"] += v[2]
        elif file.endswith("kernels.py") and fn == "moe":
            parts["fused experts"] += v[2]
        elif fn == "matmul":
            parts["BLAS matmul"] += v[2]
    parts["everything else (Python, NumPy ops)"] = total - sum(parts.values())
    return {k: v / total for k, v in parts.items()}


def peak_rss() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it does not carry the parent's peak
    across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(path: str, backend: str, threads: int, prompt: int, decode: int) -> dict:
    import dsv4
    kw = {"threads": threads} if backend == "cpu" else {}
    t0 = time.perf_counter()
    model = dsv4.load(path, backend=backend, dtype="float32", context=4096, **kw)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, prompt + decode + 8)
    warm = model.new_state(1)
    model.step(warm, ids[None, :prompt])                     # compile / warm every path once
    model.step(warm, ids[None, prompt:prompt + 1])
    state = model.new_state(1)
    prefill = _timed(lambda: model.step(state, ids[None, :prompt]))
    steps = [_timed(lambda i=i: model.step(state, ids[None, i:i + 1])) for i in range(prompt, prompt + decode)]
    tok = ids[None, -1:]
    out = {"path": path, "backend": backend, "threads": threads, "load_s": load_s,
           "prefill_tok_s": prompt / prefill, "decode_tok_s": 1 / float(np.median(steps)),
           "peak_rss_bytes": peak_rss(),
           "checkpoint_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))}
    if backend == "cpu":
        out["decode_weight_bytes"] = decode_bytes(model)
        out["split"] = split(model, state, tok, 4)
    return out


def llama(gguf: str, bench: str, threads: int, prompt: int, decode: int) -> dict:
    """llama-bench's prompt and generation rates.  `--repack 0`: with its default CPU weight repacking, this
    llama.cpp aborts on V4 (`GGML_ASSERT(*cur_backend_id != -1)`: the grouped `wo_a` product, a 3-D Q8_0
    matmul, finds no backend once the weight sits in the repack buffer)."""
    r = subprocess.run([bench, "-m", gguf, "-p", str(prompt), "-n", str(decode), "-t", str(threads), "-r", "3",
                        "--repack", "0", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(r.stdout)
    pre = next(x for x in rows if x["n_prompt"] == prompt and x["n_gen"] == 0)
    gen = next(x for x in rows if x["n_gen"] == decode and x["n_prompt"] == 0)
    return {"backend": "llama.cpp", "path": gguf, "threads": threads, "prefill_tok_s": pre["avg_ts"],
            "decode_tok_s": gen["avg_ts"], "model_bytes": Path(gguf).stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--medium", type=Path, default=Path("/tmp/dsv4-cpu-medium-v2"))
    ap.add_argument("--gguf", help="the medium checkpoint converted by llama.cpp (benchmarks/README.md)")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads, args.prompt, args.decode)))
        return
    from dsv4.portable.tiny import ensure_tiny
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    runs = [(str(ensure_tiny("tiny")), "cpu"), (str(ensure_tiny("tiny")), "reference"),
            (str(medium_checkpoint(args.medium)), "cpu")]
    results = []
    for path, backend in runs:
        r = subprocess.run([sys.executable, __file__, "--worker", path, backend, "--threads", str(args.threads),
                            "--prompt", str(args.prompt), "--decode", str(args.decode)],
                           capture_output=True, text=True, env=env, check=True)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if args.gguf and args.llama_bench:
        results.append(llama(args.gguf, args.llama_bench, args.threads, args.prompt, args.decode))
    memcpy = memcpy_gbs()
    print(f"memcpy (one copy, numpy): {memcpy:.1f} GB/s; {args.threads} threads; prompt {args.prompt}, "
          f"decode {args.decode}")
    print(f"{'model':<8} {'backend':<10} {'prefill tok/s':>13} {'decode tok/s':>12} {'MB/token':>9} "
          f"{'GB/s':>6} {'of memcpy':>9} {'peak RSS / ckpt':>16}")
    for r in results:
        name = "medium" if "medium" in r["path"] else "tiny"
        mb = r.get("decode_weight_bytes")
        bw = mb * r["decode_tok_s"] / 1e9 if mb else None
        rss = (f"{r['peak_rss_bytes'] / 2**30:.2f}/{r['checkpoint_bytes'] / 2**30:.2f} GiB"
               if "peak_rss_bytes" in r else "")
        print(f"{name:<8} {r['backend']:<10} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.2f} "
              f"{'' if mb is None else f'{mb / 1e6:.0f}':>9} {'' if bw is None else f'{bw:.1f}':>6} "
              f"{'' if bw is None else f'{bw / memcpy:.0%}':>9} {rss:>16}")
        if "split" in r:
            print("         decode step: " + ", ".join(f"{k} {v:.0%}" for k, v in r["split"].items()))
    ours = next(r for r in results if r["backend"] == "cpu" and "medium" in r["path"])
    peer = next((r for r in results if r["backend"] == "llama.cpp"), None)
    if peer:
        print(f"medium vs llama.cpp: decode {ours['decode_tok_s'] / peer['decode_tok_s']:.2f}x, "
              f"prefill {ours['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x (goals ≥ 0.5x)")
    out = Path(__file__).parent / "results" / "cpu.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "memcpy_gbs": memcpy,
                               "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Tensor + expert parallel on CPU: agreement with one process, bytes per token, per-rank memory, tok/s.

For each config (`tiny2` — `tiny` has 2 output groups, too few for 4 ranks — and `medium`: the synthetic config of mlx_decode.py with 512-wide experts so its
FP8 shared expert splits on scale-block edges at 4 ranks), each transport (torch.distributed gloo on
the cuda backend's CPU path, mx.distributed ring on MLX) and N = 1, 2, 4 ranks (N = 1: one plain
process), the ranks are started as `dsv4 --parallel` starts them (`cli.parallel._rank_env`) and:
* rank 0 prefills `--prompt` tokens and decodes `--decode` greedy tokens, keeping the prefill logits and
  the greedy ids, which are compared with N = 1 (max |Δlogit|, tokens identical or not);
* every rank counts the bytes it contributes to the model's collectives during decode (`Comm.sent`) and
  the control bytes of rank 0's calls; the model's prediction (`sharding.collectives_per_token`, with the
  indexer scores of the entries visible at each decode position) is printed beside it;
* every rank reports its RSS growth over loading (VmHWM after load − before it, so the interpreter and
  the backend's libraries are left out), the largest rank's compared with N = 1 and with the plan's
  weight fraction (`sharding.memory_plan`: per-rank ÷ single-process stored bytes), and its peak RSS;
* decode tok/s on rank 0.
On this 2-core machine N ranks share two cores: tok/s vs N shows the overhead of splitting (collectives,
Python per rank, smaller matmuls), never a speed-up.  Multi-GPU numbers are out of reach here; the
predicted per-token communication of Flash at TP=4 and Pro at TP=8 is computed from the plan.

Prints a table and writes benchmarks/results/parallel.json.  Never pass/fail.
    python benchmarks/parallel.py                      # tiny2 + medium, gloo + ring, N = 1, 2, 4
    python benchmarks/parallel.py --configs tiny2 --ranks 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "parallel.json"
BACKEND = {"gloo": "cuda", "ring": "mlx"}
TRANSPORT = {"gloo": "torch", "ring": "mlx"}


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------- one rank
def rank_main(out: Path, model: str, transport: str, prompt: int, decode: int) -> None:
    import dsv4
    from dsv4.portable import parallel
    comm = None
    if transport != "none":
        from dsv4.cli.parallel import make_comm
        comm = make_comm(TRANSPORT[transport])
    backend = BACKEND[transport] if transport != "none" else os.environ["BENCH_BACKEND"]
    __import__("torch" if backend == "cuda" else "mlx.core")
    opts = {"device": "cpu", "cuda_graphs": False} if backend == "cuda" else {}
    base = vm_hwm()                   # the interpreter and the backend's libraries, before any weight
    m = dsv4.load(model, backend=backend, dtype="float32", comm=comm, validate=False, **opts)
    rank = 0 if comm is None else comm.rank
    rec = {"rank": rank, "rss_base": base, "rss_load": vm_hwm()}
    if rank != 0:
        parallel.follow(m.runner, comm)
        rec.update(rss_peak=vm_hwm(), sent=comm.sent, control=comm.control)
        (out / f"rank{rank}.json").write_text(json.dumps(rec))
        comm.close()
        return
    ids = np.random.default_rng(0).integers(3, m.config.vocab_size, prompt)
    state = m.new_state(1)
    warm = m.new_state(1)
    m.step(warm, ids[None, :8])
    del warm
    t0 = time.perf_counter()
    logits, state = m.step(state, ids[None])
    prefill_s = time.perf_counter() - t0
    np.save(out / "prefill.npy", logits[0])
    sent0 = comm.sent if comm else 0
    ctl0 = comm.control if comm else 0
    tok, greedy = int(np.argmax(logits[0, -1])), []
    t1 = time.perf_counter()
    for _ in range(decode):
        greedy.append(tok)
        logits, state = m.step(state, np.asarray([[tok]]))
        tok = int(np.argmax(logits[0, -1]))
    decode_s = time.perf_counter() - t1
    rec.update(prefill_s=prefill_s, decode_s=decode_s, greedy=greedy, rss_peak=vm_hwm(),
               decode_sent=(comm.sent - sent0) if comm else 0, decode_control=(comm.control - ctl0) if comm else 0)
    if comm:
        m.runner.stop()
        comm.close()
        rec.update(sent=comm.sent, control=comm.control)
    (out / "rank0.json").write_text(json.dumps(rec))


# ---------------------------------------------------------------------- one run of N ranks
def run(model: Path, transport: str, world: int, prompt: int, decode: int, timeout: float) -> dict:
    from dsv4.cli.parallel import _rank_env
    out = Path(tempfile.mkdtemp(prefix="dsv4-par-"))
    base = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT.parent),
                BENCH_BACKEND=BACKEND[transport])
    cmd = [sys.executable, __file__, "--rank", str(out), str(model), "none" if world == 1 else transport,
           str(prompt), str(decode)]
    envs = [{}] if world == 1 else _rank_env(TRANSPORT[transport], world)
    procs = [subprocess.Popen(cmd, env=dict(base, **e), stderr=subprocess.PIPE, text=True) for e in envs]
    try:
        for p in procs:
            p.wait(timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    bad = [p.stderr.read()[-400:] for p in procs if p.returncode != 0]
    if bad:
        raise RuntimeError(f"{transport} N={world}: {bad}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return {"ranks": ranks, "prefill": np.load(out / "prefill.npy")}


def predicted_decode_bytes(cfg, world: int, prompt: int, decode: int) -> int:
    """Contributed bytes of `decode` single-token steps after `prompt` tokens (the indexer scores at step
    position t: its t // 4 stored entries, trimmed to those, plus the one candidate of the step)."""
    from dsv4.portable.sharding import collectives_per_token
    return sum(collectives_per_token(cfg, world, entries=(prompt + i) // 4 + 1)["contributed_bytes"]
               for i in range(decode))


def medium_dir(cache: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from mlx_decode import checkpoint_dir
    return checkpoint_dir("medium", 512, cache)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny2,medium")
    ap.add_argument("--transports", default="gloo,ring")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dsv4-bench"))
    ap.add_argument("--rank", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        out, model, transport, prompt, decode = args.rank
        rank_main(Path(out), model, transport, int(prompt), int(decode))
        return
    from dsv4.portable.config import ModelConfig, preset
    from dsv4.portable.sharding import collectives_per_token, memory_plan
    from dsv4.portable.tiny import ensure_tiny
    results = {"machine": platform.platform(), "cpus": os.cpu_count(), "prompt": args.prompt,
               "decode": args.decode, "runs": [], "note": "N ranks share the machine's cores: tok/s vs N "
                                                          "is overhead, not speed-up"}
    rows = []
    for name in args.configs.split(","):
        path = medium_dir(Path(args.cache)) if name == "medium" else ensure_tiny(name)
        cfg = ModelConfig.from_file(path)
        for transport in args.transports.split(","):
            base = None
            for world in [int(n) for n in args.ranks.split(",")]:
                r = run(path, transport, world, args.prompt, args.decode, args.timeout)
                r0 = r["ranks"][0]
                base = base or r
                plan = memory_plan(cfg, world)
                rec = {"config": name, "transport": transport, "ranks": world,
                       "greedy_equal": r0["greedy"] == base["ranks"][0]["greedy"],
                       "max_abs_logit_diff": float(np.abs(r["prefill"] - base["prefill"]).max()),
                       "logit_scale": float(np.abs(base["prefill"]).max()),
                       "decode_tok_s": args.decode / r0["decode_s"], "prefill_tok_s": args.prompt / r0["prefill_s"],
                       "sent_per_token": r0["decode_sent"] / args.decode,
                       "predicted_per_token": predicted_decode_bytes(cfg, world, args.prompt, args.decode) / args.decode,
                       "control_per_token": r0["decode_control"] / args.decode,
                       "rss_peak": [x["rss_peak"] for x in r["ranks"]],
                       "rss_load_above_base": [x["rss_load"] - x["rss_base"] for x in r["ranks"]],
                       "rss_vs_one": max(x["rss_load"] - x["rss_base"] for x in r["ranks"])
                       / (base["ranks"][0]["rss_load"] - base["ranks"][0]["rss_base"]),
                       "weights_fraction_planned": plan.per_rank / plan.total}
                results["runs"].append(rec)
                rows.append(rec)
                print(f"{name:7} {transport:5} N={world}  greedy {'=' if rec['greedy_equal'] else '≠'}  "
                      f"max|Δ| {rec['max_abs_logit_diff']:.2e} (of {rec['logit_scale']:.1f})  "
                      f"decode {rec['decode_tok_s']:6.2f} tok/s  sent/token {rec['sent_per_token']:9.0f} B "
                      f"(plan {rec['predicted_per_token']:9.0f})  control/token {rec['control_per_token']:6.0f} B  "
                      f"load RSS/N=1 {rec['rss_vs_one']:.2f} (weights plan {rec['weights_fraction_planned']:.2f})",
                      flush=True)
    results["predicted"] = {}
    for name, world, ctx in (("flash", 4, 65536), ("pro", 8, 65536), ("flash", 4, 4096), ("pro", 8, 4096)):
        cfg = preset(name)
        c = collectives_per_token(cfg, world, entries=ctx // 4 + 1, itemsize=2)
        plan = memory_plan(cfg, world)
        results["predicted"][f"{name}-tp{world}-ctx{ctx}"] = dict(
            c, per_rank_weight_bytes=plan.per_rank, single_process_weight_bytes=plan.total, dtype="bfloat16")
        print(f"{name} TP={world} at {ctx} tokens (bf16 collectives): {c['collectives']} collectives/token, "
              f"{c['bytes_sent'] / 2**20:.2f} MiB sent per token per rank (ring), weights "
              f"{plan.per_rank / 2**30:.1f} of {plan.total / 2**30:.1f} GiB per rank")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

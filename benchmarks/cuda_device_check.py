"""One-shot device check for the CUDA/Triton backend on a lent GPU (an H200): correctness, then speed.

(a) every Triton kernel vs its op-path decomposition on the device, and the whole tiny model (kernels +
    CUDA-graph decode) vs the float64 NumPy oracle;
(b) kernel timings at Flash-scale shapes with CUDA events: one layer's attention (decode, HCA and CSA index
    sets at 8K / 64K / 1M context, and a 256-query prefill chunk), MoE at 1–64 tokens (FP4 experts),
    the indexer at 64K / 1M, FP8 linear, mHC;
(c) achieved bandwidth / FLOP/s next to ceilings measured in the same run (device memcpy, bf16 GEMM).

Prints a table and writes benchmarks/results/cuda_h200.json (or cuda_dryrun.json).  Budget: < 8 minutes —
`--budget-s` (default 420) is a global deadline after which pending timings are recorded as skipped, and
each timing stops repeating after 3 s.
`--dry-run` runs the same code on tiny shapes on the CPU under TRITON_INTERPRET=1 (wall-clock timing),
to prove the script works before device time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsv4  # noqa: E402
from dsv4.backends.cuda import kernels as K  # noqa: E402
from dsv4.backends.cuda.ops import TorchOps  # noqa: E402
from dsv4.backends.cuda.weights import ExpertBank, TorchQuant  # noqa: E402
from dsv4.portable.tiny import ensure_tiny  # noqa: E402

DEV = torch.device("cpu" if DRY else "cuda")
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- timing
def timed(fn, reps: int, cap_s: float = 3.0) -> float:
    """Median seconds per call (CUDA events on the device, wall clock in the dry run); stops repeating once
    `cap_s` of wall time is spent, so one slow shape cannot eat the run's budget."""
    fn()
    times = []
    t_end = time.perf_counter() + cap_s
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    for _ in range(reps):
        if DEV.type == "cpu":
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        else:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        if time.perf_counter() > t_end:
            break
    return float(np.median(times))


# ---------------------------------------------------------------------- random quantized weights
def rand_quant(fmt: str, out: int, inp: int, lead=()) -> TorchQuant:
    """Random valid codes with power-of-two scales (no NaN codes), directly on the device."""
    if fmt == "fp4":
        data = torch.randint(0, 256, (*lead, out, inp // 2), dtype=torch.uint8, device=DEV)
        scale = torch.exp2(torch.randint(-9, -5, (*lead, out, inp // 32), device=DEV).float())
    else:
        data = torch.randint(0, 256, (*lead, out, inp), dtype=torch.uint8, device=DEV)
        data = torch.where((data & 0x7F) == 0x7F, data ^ 0x01, data).view(torch.float8_e4m3fn)
        scale = torch.exp2(torch.randint(-12, -8, (*lead, -(-out // 128), -(-inp // 128)), device=DEV).float())
    return TorchQuant(fmt, data, scale, (out, inp))


def rand_bank(fmt, e, d, i) -> ExpertBank:
    return ExpertBank(rand_quant(fmt, i, d, (e,)), rand_quant(fmt, d, i, (e,)), rand_quant(fmt, i, d, (e,)), e)


# ---------------------------------------------------------------------- (a) correctness
def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def check_kernels(small: bool) -> dict:
    op = TorchOps("float32", device=DEV, kernels=False)
    g = torch.Generator(device=DEV).manual_seed(int(time.time()))
    rn = lambda *s: torch.randn(*s, generator=g, device=DEV)   # noqa: E731
    out = {}
    h, d, n, k = (5, 96, 45, 37) if small else (64, 512, 3000, 640)
    for s in (1, 7):
        q, kv = rn(2, s, h, d), rn(2, n, d)
        idx = torch.randint(-1, n, (2, s, k), generator=g, device=DEV)
        idx[0, 0] = -1
        sink = rn(h)
        out[f"sink_attention S={s}"] = rel(K.sink_attention(q, kv, idx, sink, d ** -0.5),
                                          op.sink_attention(q, kv, idx, sink, d ** -0.5))
    nh, c, n, kk = (6, 40, 53, 8) if small else (64, 128, 4096, 512)
    qi, w, keys = rn(2, 3, nh, c), rn(2, 3, nh), rn(2, n, c)
    vis = torch.tensor([[0, 1, n], [n // 2, n - 3, 5]], device=DEV)
    a, b = K.indexer_topk(qi, w, keys, vis, kk), op.indexer_topk(qi, w, keys, vis, kk)
    out["indexer_topk (rows differ)"] = float((a != b).any(-1).float().mean())
    hc, dd = 4, (200 if small else 4096)
    hh, fn = rn(2, 3, hc, dd), 0.05 * rn(24, hc * dd)
    base, sc = 0.1 * rn(24), 1 + 0.1 * rn(3)
    got, want = K.hc_pre(hh, fn, base, sc, 20, 1e-6, 1e-6), op.hc_pre(hh, fn, base, sc, 20, 1e-6, 1e-6)
    out["hc_pre"] = max(rel(x, y) for x, y in zip(got, want))
    f = rn(2, 3, dd)
    out["hc_post"] = rel(K.hc_post(f, hh, want[1], want[2]), op.hc_post(f, hh, want[1], want[2]))
    e, d2, i2, t2 = (6, 96, 160, 19) if small else (32, 1024, 512, 64)
    for fmt in ("fp4", "fp8"):
        bank = rand_bank(fmt, e, d2, i2)
        x = rn(t2, d2)
        idx = torch.stack([torch.randperm(e, generator=g, device=DEV)[:3] for _ in range(t2)])
        wts = torch.rand(t2, 3, generator=g, device=DEV)
        out[f"moe {fmt}"] = rel(K.moe(x, idx, wts, bank, 10.0), op.moe(x, idx, wts, bank, 10.0))
    wq = rand_quant("fp8", 200 if small else 4096, 300 if small else 1024)
    x = rn(5, wq.shape[1])
    out["fp8_linear"] = rel(K.fp8_linear(x, wq), op.linear(x, wq))
    return out


def check_model(n_tokens: int, kernels) -> dict:
    out = {}
    for name in ("tiny", "tiny2"):
        path = ensure_tiny(name)
        ids = np.random.default_rng().integers(3, 1024, n_tokens)
        ref = dsv4.load(path, backend="reference", dtype="float64", context=512).forward(ids, full_precision=True)
        m = dsv4.load(path, backend="cuda", dtype="float32", context=512, kernels=kernels)
        one = m.forward(ids)
        out[f"{name} forward rel"] = float((np.abs(one - ref).max(-1) / np.abs(ref).max(-1)).max())
        half = n_tokens // 2
        logits, st = m.step(m.new_state(), ids[None, :half])
        dec = [logits[0]]
        for i in range(half, n_tokens):
            logits, st = m.step(st, ids[None, i:i + 1])
            dec.append(logits[0])
        dec = np.concatenate(dec, 0)
        out[f"{name} prefill+decode rel"] = float((np.abs(dec - ref).max(-1) / np.abs(ref).max(-1)).max())
        rb = dsv4.load(path, backend="reference", dtype="bfloat16", context=512).forward(ids)
        mb = dsv4.load(path, backend="cuda", dtype="bfloat16", context=512, kernels=kernels)
        out[f"{name} bf16 vs reference-bf16 rel"] = float((np.abs(mb.forward(ids) - rb).max(-1) /
                                                          np.abs(rb).max(-1)).max())
    return out


# ---------------------------------------------------------------------- (b, c) speed
def ceilings(small: bool) -> dict:
    nbytes = (16 << 20) if small else (2 << 30)
    a = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), 3 if small else 10)
    n = 256 if small else 8192
    x = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    tg = timed(lambda: x @ x, 2 if small else 10)
    return {"memcpy_GBps": 2 * nbytes / t / 1e9, "bf16_gemm_TFLOPs": 2 * n ** 3 / tg / 1e12}


class Timings:
    """Timed rows under the run's global deadline: once it has passed, the remaining rows are recorded as
    skipped (with their shapes) instead of timed, so the whole script stays inside its budget."""

    def __init__(self, deadline: float):
        self.deadline, self.rows = deadline, []

    def add(self, kernel: str, shape: str, fn, reps: int, nbytes: float, flops: float) -> None:
        if time.time() > self.deadline:
            self.rows.append(dict(kernel=kernel, shape=shape, skipped="deadline"))
            return
        t = timed(fn, reps)
        self.rows.append(dict(kernel=kernel, shape=shape, ms=t * 1e3, GBps=nbytes / t / 1e9,
                              TFLOPs=flops / t / 1e12))


def bench(small: bool, deadline: float) -> list:
    T = Timings(deadline)
    reps = 2 if small else 20
    bf = DEV.type == "cuda"
    kvdt = torch.bfloat16 if bf else torch.float32
    esz = torch.empty((), dtype=kvdt).element_size()
    h, d = (4, 64) if small else (64, 512)
    ctxs = [512, 1024] if small else [8192, 65536, 1048576]
    for ctx in ctxs:
        for kind, m, topk in (("HCA", 128 if not small else 16, None), ("CSA", 4, 512 if not small else 8)):
            n = 128 + ctx // m
            k = 128 + (topk if topk else ctx // m)
            kv = torch.randn(1, n, d, device=DEV).to(kvdt)
            q = torch.randn(1, 1, h, d, device=DEV).to(kvdt)
            idx = torch.randint(0, n, (1, 1, k), device=DEV)
            sink = torch.randn(h, device=DEV)
            T.add("sink_attention decode", f"{kind} ctx={ctx} K={k} H={h}",
                  lambda: K.sink_attention(q, kv, idx, sink, 0.04, bf), reps, k * d * esz, 4 * h * k * d)
    s = 16 if small else 256
    n = 128 + ctxs[0] // 4
    kv = torch.randn(1, n, d, device=DEV).to(kvdt)
    q = torch.randn(1, s, h, d, device=DEV).to(kvdt)
    idx = torch.randint(0, n, (1, s, 640 if not small else 24), device=DEV)
    sink = torch.randn(h, device=DEV)
    kk = idx.shape[-1]
    T.add("sink_attention prefill", f"S={s} K={kk}", lambda: K.sink_attention(q, kv, idx, sink, 0.04, bf), reps,
          s * kk * d * esz, 4 * s * h * kk * d)
    nh, c = (8, 64) if small else (64, 128)
    topk = 8 if small else 512
    for ctx in ([512] if small else [65536, 1048576]):
        n = ctx // 4
        keys = torch.randn(1, n, c, device=DEV).to(kvdt)
        qi, w = torch.randn(1, 1, nh, c, device=DEV), torch.randn(1, 1, nh, device=DEV)
        vis = torch.tensor([[n]], device=DEV)
        T.add("indexer top-k (fused)", f"ctx={ctx} N={n} k={topk}", lambda: K.indexer_topk(qi, w, keys, vis, topk),
              reps, n * c * esz, 2 * nh * n * c)
    e, dm, im, topk = (8, 256, 128, 2) if small else (256, 4096, 2048, 6)
    bank = rand_bank("fp4", e, dm, im)
    for ntok in ([1, 4] if small else [1, 8, 64]):
        x = torch.randn(ntok, dm, device=DEV)
        idx = torch.stack([torch.randperm(e, device=DEV)[:topk] for _ in range(ntok)])
        wts = torch.rand(ntok, topk, device=DEV)
        touched = len(torch.unique(idx))
        T.add("moe fp4", f"tokens={ntok} experts touched={touched}", lambda: K.moe(x, idx, wts, bank, 10.0, None, bf),
              reps, touched * 3 * im * dm * 0.5 * (1 + 1 / 16), 6 * ntok * topk * im * dm)
    nout, nin = (512, 256) if small else (32768, 1024)
    wq = rand_quant("fp8", nout, nin)
    for mrows in (1, 64):
        x = torch.randn(mrows, nin, device=DEV)
        T.add("fp8_linear", f"M={mrows} N={nout} K={nin}", lambda: K.fp8_linear(x, wq, bf), reps,
              nout * nin, 2 * mrows * nout * nin)
    dh = 256 if small else 4096
    fn, base, sc = torch.randn(24, 4 * dh, device=DEV) * 0.05, torch.zeros(24, device=DEV), torch.ones(3, device=DEV)
    for ntok in (1, 64):
        hh = torch.randn(1, ntok, 4, dh, device=DEV)
        T.add("hc_pre", f"tokens={ntok} D={dh}", lambda: K.hc_pre(hh, fn, base, sc, 20, 1e-6, 1e-6), reps,
              ntok * 4 * dh * 4 * 2 + fn.numel() * 4, 2 * ntok * 24 * 4 * dh)
    return T.rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="global time budget: timings still pending when it runs out are recorded as skipped")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on the CPU")
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dry_run": args.dry_run}
    report["kernel_checks_rel_err"] = check_kernels(args.dry_run)
    report["model_checks_rel_err"] = check_model(24 if args.dry_run else 300, False if args.dry_run else None)
    report["ceilings"] = ceilings(args.dry_run)
    report["timings"] = bench(args.dry_run, t0 + args.budget_s)
    report["budget_s"] = args.budget_s
    report["skipped_for_deadline"] = sum("skipped" in r for r in report["timings"])
    report["wall_s"] = time.time() - t0

    print(f"device: {report['device']}   torch {report['torch']}")
    for section in ("kernel_checks_rel_err", "model_checks_rel_err"):
        print(f"\n{section}")
        for k, v in report[section].items():
            print(f"  {k:<36} {v:.3e}")
    ce = report["ceilings"]
    print(f"\nceilings: memcpy {ce['memcpy_GBps']:.0f} GB/s, bf16 GEMM {ce['bf16_gemm_TFLOPs']:.1f} TFLOP/s")
    print(f"\n{'kernel':<24} {'shape':<38} {'ms':>9} {'GB/s':>9} {'%bw':>6} {'TFLOP/s':>9} {'%gemm':>6}")
    for r in report["timings"]:
        if "skipped" in r:
            print(f"{r['kernel']:<24} {r['shape']:<38} skipped: {r['skipped']}")
            continue
        r["pct_bw"] = 100 * r["GBps"] / ce["memcpy_GBps"]
        r["pct_gemm"] = 100 * r["TFLOPs"] / ce["bf16_gemm_TFLOPs"]
        print(f"{r['kernel']:<24} {r['shape']:<38} {r['ms']:>9.3f} {r['GBps']:>9.1f} {r['pct_bw']:>6.1f} "
              f"{r['TFLOPs']:>9.3f} {r['pct_gemm']:>6.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("cuda_dryrun.json" if args.dry_run else "cuda_h200.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}  ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

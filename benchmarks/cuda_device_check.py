"""One-shot device check for the CUDA/Triton backend on a lent GPU (an H200): correctness, then speed.

(a) every Triton kernel vs its op-path decomposition on the device, the whole tiny model (kernels +
    CUDA-graph decode) vs the float64 NumPy oracle in both state formats, bfloat16 deploy vs the
    reference's bfloat16 deploy path, and CUDA-graph decode vs eager decode on in-place states (across a
    capacity bucket boundary, for a fork, with the state's buffers kept as the graph's static buffers);
(b) kernel timings at Flash-scale shapes with CUDA events: one layer's attention (decode, HCA and CSA index
    sets at 8K / 64K / 1M context, and a 256-query prefill chunk), MoE at 1–64 tokens (FP4 experts),
    the indexer at 64K / 1M, FP8 linear, mHC;
(c) achieved bandwidth / FLOP/s next to ceilings measured in the same run (device memcpy, bf16 GEMM);
(d) decode ms/token of the tiny model (bfloat16, deploy state, CUDA graphs) with 1K and 16K tokens held
    at a 1M context, and 1K held at a 4K context, with the state bytes held (`Model.state_info`): decode
    cost and memory follow the tokens held, not the context.

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
from dsv4.portable import quant  # noqa: E402
from dsv4.portable.config import preset  # noqa: E402
from dsv4.portable.ops import Segment  # noqa: E402
from dsv4.portable.tiny import ensure_tiny, write_checkpoint  # noqa: E402

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


def _attn_segments(rn, g, s, d, n_win, n, k, k_pq):
    """The segment forms one layer attends: the masked window ring, gathered entries, rows per query."""
    win = Segment.dense(rn(2, n_win, d), torch.rand(2, s, n_win, generator=g, device=DEV) < 0.7)
    ent = Segment.gather(rn(2, n, d), torch.randint(-1, n, (2, s, k), generator=g, device=DEV))
    pq = Segment.per_query(rn(2, s, k_pq, d), torch.rand(2, s, k_pq, generator=g, device=DEV) < 0.5)
    return [win, ent, pq]


def check_kernels(small: bool) -> dict:
    op = TorchOps("float32", device=DEV, kernels=False)
    g = torch.Generator(device=DEV).manual_seed(int(time.time()))
    rn = lambda *s: torch.randn(*s, generator=g, device=DEV)   # noqa: E731
    out = {}
    h, d, n, k = (5, 96, 45, 37) if small else (64, 512, 3000, 640)
    for s in (1, 7):
        q = rn(2, s, h, d)
        segs = _attn_segments(rn, g, s, d, 129, n, k, 17 if small else 512)
        segs[1].idx[0, 0] = -1
        sink = rn(h)
        out[f"sink_attention S={s}"] = rel(K.sink_attention(q, segs, sink, d ** -0.5),
                                          op.sink_attention(q, segs, sink, d ** -0.5))
    nh, c, n, kk = (6, 40, 53, 8) if small else (64, 128, 4096, 512)
    qi, w, keys, new = rn(2, 3, nh, c), rn(2, 3, nh), rn(2, n, c), rn(2, 5, c)
    segs = [(keys, torch.tensor([[0, 1, n], [n // 2, n - 3, 5]], device=DEV)),
            (new, torch.tensor([[1, 0, 5], [3, 2, 5]], device=DEV))]
    a, b = K.indexer_topk(qi, w, segs, kk), op.indexer_topk(qi, w, segs, kk)
    out["indexer_topk (rows differ)"] = float(torch.stack([(x != y).any(-1) for x, y in zip(a, b)]).float().mean())
    codes = rn(2, 7, 512) * 3
    c8, s8 = op.encode_fp8(codes, 64)
    want8 = quant.encode_fp8_blocks(codes.cpu().numpy(), 64)
    c4, s4 = op.encode_fp4(codes, 32)
    want4 = quant.encode_fp4_blocks(codes.cpu().numpy(), 32)
    out["codecs (bytes differ)"] = float(sum(int((x.cpu().numpy() != y).sum())
                                            for x, y in zip((c8, s8, c4, s4), want8 + want4)))
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


def _rel_rows(a, ref) -> float:
    return float((np.abs(a - ref).max(-1) / np.abs(ref).max(-1)).max())


def check_model(n_tokens: int, kernels) -> dict:
    out = {}
    for name in ("tiny", "tiny2"):
        path = ensure_tiny(name)
        ids = np.random.default_rng().integers(3, 1024, n_tokens)
        for fmt in ("bf16", "deploy"):
            ref = dsv4.load(path, backend="reference", dtype="float64", context=512,
                            state_format=fmt).forward(ids, full_precision=True)
            m = dsv4.load(path, backend="cuda", dtype="float32", context=512, kernels=kernels, state_format=fmt)
            out[f"{name} {fmt} forward rel"] = _rel_rows(m.forward(ids), ref)
            half = n_tokens // 2
            st = m.new_state()
            logits, _ = m.step(st, ids[None, :half])
            dec = [logits[0]]
            for i in range(half, n_tokens):
                logits, _ = m.step(st, ids[None, i:i + 1])
                dec.append(logits[0])
            out[f"{name} {fmt} prefill+decode rel"] = _rel_rows(np.concatenate(dec, 0), ref)
        exact = dsv4.load(path, backend="reference", dtype="float64", context=512,
                          state_format="deploy").forward(ids, full_precision=True)
        emu = dsv4.load(path, backend="reference", dtype="bfloat16", context=512, state_format="deploy").forward(ids)
        mb = dsv4.load(path, backend="cuda", dtype="bfloat16", context=512, kernels=kernels)
        got = mb.forward(ids)
        med = lambda x: float(np.median(np.abs(x - exact).max(-1) / np.abs(exact).max(-1)))   # noqa: E731
        out[f"{name} bf16 deploy median rel"] = med(got)
        out[f"{name} reference bf16 deploy median rel (floor)"] = med(emu)
    return out


def check_graphs(kernels) -> dict:
    """CUDA-graph decode vs eager decode (max relative logit difference over all steps): prefill 120, decode
    across the 128 → 256 capacity bucket (a new capture), then a fork and its parent stepped alternately.
    Also counts steps after which a state did not hold the same tensors as before (must be 0 within a
    bucket: the graph's static buffers are the state's buffers)."""
    out = {}
    if DEV.type != "cuda":
        return out
    path = ensure_tiny("tiny")
    ids = np.random.default_rng().integers(3, 1024, 150)
    for dtype in ("float32", "bfloat16"):
        for fmt in ("bf16", "deploy"):
            g = dsv4.load(path, backend="cuda", dtype=dtype, context=512, kernels=kernels, state_format=fmt)
            e = dsv4.load(path, backend="cuda", dtype=dtype, context=512, kernels=kernels, state_format=fmt,
                          cuda_graphs=False)
            sg, se = g.new_state(), e.new_state()
            g.step(sg, ids[None, :120])
            e.step(se, ids[None, :120])
            worst, moved = 0.0, 0
            for i in range(120, 140):
                objs, cap = dict(sg.buffers), sg.capacity
                lg, _ = g.step(sg, ids[None, i:i + 1])
                le, _ = e.step(se, ids[None, i:i + 1])
                worst = max(worst, _rel_rows(lg[0], le[0]))
                moved += sg.capacity == cap and any(sg.buffers[k] is not v for k, v in objs.items())
            fg, fe = g.fork_state(sg), e.fork_state(se)
            for i in range(140, 150):
                for (model, st), tok in zip(((g, sg), (e, se), (g, fg), (e, fe)), (ids[i], ids[i], ids[i] ^ 1, ids[i] ^ 1)):
                    logits, _ = model.step(st, np.asarray([[tok]]))
                    if model is g:
                        last_g = logits
                    else:
                        worst = max(worst, _rel_rows(last_g[0], logits[0]))
            out[f"graph vs eager {dtype} {fmt} rel"] = worst
            out[f"graph steps that moved buffers {dtype} {fmt}"] = float(moved)
            out[f"graphs cached {dtype} {fmt}"] = float(len(g.runner._graphs))
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
    w = 128                                   # sliding window rows
    for ctx in ctxs:
        for kind, m, topk in (("HCA", 128 if not small else 16, None), ("CSA", 4, 512 if not small else 8)):
            n = ctx // m
            k = topk if topk else n
            win = Segment.dense(torch.randn(1, w + 1, d, device=DEV).to(kvdt), torch.ones(1, 1, w + 1, dtype=torch.bool,
                                                                                         device=DEV))
            ent = Segment.gather(torch.randn(1, n, d, device=DEV).to(kvdt), torch.randint(0, n, (1, 1, k), device=DEV))
            q = torch.randn(1, 1, h, d, device=DEV).to(kvdt)
            sink = torch.randn(h, device=DEV)
            T.add("sink_attention decode", f"{kind} ctx={ctx} W+K={w + 1 + k} H={h}",
                  lambda: K.sink_attention(q, [win, ent], sink, 0.04, bf), reps, (w + 1 + k) * d * esz,
                  4 * h * (w + 1 + k) * d)
    s = 16 if small else 256
    n = ctxs[0] // 4
    kk = 640 if not small else 24
    seg = [Segment.gather(torch.randn(1, n, d, device=DEV).to(kvdt), torch.randint(0, n, (1, s, kk), device=DEV))]
    q = torch.randn(1, s, h, d, device=DEV).to(kvdt)
    sink = torch.randn(h, device=DEV)
    T.add("sink_attention prefill", f"S={s} K={kk}", lambda: K.sink_attention(q, seg, sink, 0.04, bf), reps,
          s * kk * d * esz, 4 * s * h * kk * d)
    nh, c = (8, 64) if small else (64, 128)
    topk = 8 if small else 512
    for ctx in ([512] if small else [65536, 1048576]):
        n = ctx // 4
        keys = torch.randn(1, n, c, device=DEV).to(kvdt)
        qi, w = torch.randn(1, 1, nh, c, device=DEV), torch.randn(1, 1, nh, device=DEV)
        vis = torch.tensor([[n]], device=DEV)
        T.add("indexer top-k (fused)", f"ctx={ctx} N={n} k={topk}", lambda: K.indexer_topk(qi, w, [(keys, vis)], topk),
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


def decode_vs_held(small: bool, deadline: float, kernels) -> list:
    """Decode ms/token (median over the steps) and state bytes of the tiny model, bfloat16 + deploy state,
    at two held lengths under a large context, and at the small held length under a small context: the
    cost should follow the tokens held, not the context."""
    import dataclasses
    import tempfile
    big_ctx = 4096 if small else 1 << 20
    cfg = dataclasses.replace(preset("tiny"), max_position_embeddings=big_ctx)
    path = write_checkpoint(cfg, Path(tempfile.mkdtemp()) / "tiny_long", tokenizer=None)
    rows = []
    held_lengths = [(64, 512), (64, big_ctx), (512, big_ctx)] if small else [(1024, 4096), (1024, big_ctx),
                                                                             (16384, big_ctx)]
    steps = 4 if small else 32
    for held, ctx in held_lengths:
        if time.time() > deadline:
            rows.append(dict(held=held, context=ctx, skipped="deadline"))
            continue
        m = dsv4.load(path, backend="cuda", dtype="bfloat16", context=ctx, kernels=kernels)
        ids = np.random.default_rng(held).integers(3, 1024, held + steps + 2)
        st = m.new_state()
        t0 = time.perf_counter()
        m.step(st, ids[None, :held])
        prefill_s = time.perf_counter() - t0
        m.step(st, ids[None, held:held + 1])              # the first decode step captures the graph
        times = []
        for i in range(held + 1, held + 1 + steps):
            t = time.perf_counter()
            m.step(st, ids[None, i:i + 1])                # includes the logits' copy to the host
            times.append(time.perf_counter() - t)
        info = m.state_info(st)
        rows.append(dict(held=held, context=ctx, decode_ms=1e3 * float(np.median(times)), prefill_s=prefill_s,
                         state_bytes=info["bytes"], capacity=info["capacity"], tokens=info["tokens"],
                         state_format=m.runner.state_format))
    return rows


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
    kernels = False if args.dry_run else None
    report["model_checks_rel_err"] = check_model(24 if args.dry_run else 300, kernels)
    report["graph_checks"] = check_graphs(kernels)
    report["ceilings"] = ceilings(args.dry_run)
    report["decode_vs_held"] = decode_vs_held(args.dry_run, t0 + 0.6 * args.budget_s, kernels)
    report["timings"] = bench(args.dry_run, t0 + args.budget_s)
    report["budget_s"] = args.budget_s
    report["skipped_for_deadline"] = sum("skipped" in r for r in report["timings"])
    report["wall_s"] = time.time() - t0

    print(f"device: {report['device']}   torch {report['torch']}")
    for section in ("kernel_checks_rel_err", "model_checks_rel_err", "graph_checks"):
        print(f"\n{section}")
        for k, v in report[section].items():
            print(f"  {k:<48} {v:.3e}")
    print(f"\n{'held':>7} {'context':>8} {'decode ms/tok':>14} {'prefill s':>10} {'state bytes':>12} {'capacity':>9}")
    for r in report["decode_vs_held"]:
        if "skipped" in r:
            print(f"{r['held']:>7} {r['context']:>8} skipped: {r['skipped']}")
            continue
        print(f"{r['held']:>7} {r['context']:>8} {r['decode_ms']:>14.3f} {r['prefill_s']:>10.2f} "
              f"{r['state_bytes']:>12} {r['capacity']:>9}")
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

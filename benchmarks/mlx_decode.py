"""MLX backend speed: decode and prefill tokens/s, weight bandwidth per decoded token, peak memory.

For each config (the `tiny` preset and a `medium` synthetic one: hidden 2048, 8 layers, 64 experts top-6),
in a fresh subprocess so peak RSS belongs to that model alone:
* decode tok/s: single-token steps at batch 1 after a short prompt;
* prefill tok/s at each length in --prefill (skipped above the model's context, and skipped with the
  reason recorded when the rate measured at the previous length projects it past --prefill-budget-s);
* bandwidth ratio: bytes of weights one decoded token touches (everything but the embedding table and the
  routed experts, plus one embedding row and top-k/E of the routed banks) ÷ step time, against memcpy
  bandwidth measured in the same run (bytes copied ÷ time; target ≥ 0.7 on medium);
* peak RSS (VmHWM) ÷ checkpoint bytes right after loading (target ≤ 1.1) and at the end of the run
  (adding the state buffers, prefill activations and MLX's allocator cache);
* per weight form (dense float32/bfloat16, mxfp4, mxfp8, affine): one decode-shaped matmul's weight
  bytes/s against the same memcpy, and each config's decoded-token bytes split by form — together they
  say which kernel bounds the ratio on this device.

Prints a table and writes benchmarks/results/mlx.json.  Never pass/fail.  Example (quick, CPU):
    python benchmarks/mlx_decode.py --configs tiny,medium --prefill 1024 --decode 8
On this 2-core CPU machine prefill runs at about 2 tokens/s on medium, so 8K/32K prefill would take hours
there (the budget skips them); they are meant for Metal.  The limit is MLX's CPU kernels, not weight
decoding: no weight form's decode matmul reaches memcpy speed there (the kernel table; mxfp8, which the
checkpoint's FP8 layers map to bit-exactly, is the slowest), and its float32 matmul is the bundled
reference BLAS (≈1 GFLOP/s), so neither keeping dense weight copies for a prefill (decoding a weight costs
≈1 % of its matmul there) nor grouping MoE rows by expert changes the prefill rate measurably on this CPU.
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


def _expert_scale_code(fan_in: int) -> int:
    """E8M0 code of the per-32 scale that gives uniformly random e2m1 codes a std of about 1/sqrt(fan_in)
    (uniform codes have an RMS of 2.93)."""
    return int(round(127 + np.log2(1.0 / np.sqrt(fan_in) / 2.93)))


def synthetic_medium(cfg, out: Path, seed: int = 0, shard_bytes: int = 512 << 20) -> Path:
    """The medium checkpoint in the official layout, written without `tiny.synthetic_tensors`' per-expert
    float draw + FP4 quantization (minutes of NumPy for 1.9 GB): routed experts get uniformly random
    packed e2m1 bytes with a constant power-of-two scale per layer, every other tensor is drawn as the tiny
    presets draw theirs."""
    from dsv4.portable.checkpoint import save_sharded, schema
    from dsv4.portable.quant import quantize_fp8_block
    from dsv4.portable.tiny import synthetic_tensors
    small = dataclasses.replace(cfg, moe_intermediate_size=32)   # same non-expert tensors, tiny experts
    tensors = {n: v for n, v in synthetic_tensors(small, seed).items() if ".ffn.experts." not in n}
    small_shapes = {s.name: s.shape for s in schema(small)}
    rng = np.random.default_rng(seed + 1)
    ordered = {}
    for s in schema(cfg):
        if s.name in ordered:
            continue
        if ".shared_experts." in s.name and s.shape != small_shapes[s.name]:    # sized by the expert width
            prefix = s.name[:-len(".weight")]              # schema order: .weight, then its .scale
            qw = quantize_fp8_block(rng.standard_normal(s.shape).astype(np.float32) / np.sqrt(s.shape[1]))
            ordered[prefix + ".weight"], ordered[prefix + ".scale"] = ("F8_E4M3", qw.data), ("F8_E8M0", qw.scale)
        elif ".ffn.experts." not in s.name:
            ordered[s.name] = tensors[s.name]
        elif s.name.endswith(".weight"):
            ordered[s.name] = ("I8", np.frombuffer(rng.bytes(int(np.prod(s.shape))), np.uint8).reshape(s.shape))
        else:
            code = _expert_scale_code(s.shape[1] * 32)
            ordered[s.name] = ("F8_E8M0", np.full(s.shape, code, np.uint8))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    save_sharded(out, ordered, shard_bytes)
    return out


def checkpoint_dir(name: str, inter: int, root: Path) -> Path:
    from dsv4.portable.config import preset
    from dsv4.portable.tiny import write_checkpoint
    path = root / (f"{name}-{inter}-v2" if name == "medium" else name)
    if not (path / "model.safetensors.index.json").exists():
        if name == "medium":
            synthetic_medium(medium_config(inter), path)
        else:
            write_checkpoint(preset(name), path, tokenizer=None)
    return path


def memcpy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s of a plain memcpy (NumPy copyto of nbytes, best of 5): bytes copied ÷ time, so each byte is
    counted once although it is read and written (the DRAM traffic is twice this)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def vm_status(key: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS, VmHWM; Linux), else the rusage peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def touched_bytes(model) -> dict:
    """Weight bytes one decoded token reads, by storage form (mxfp4, mxfp8, affine, dense QLinears, and
    "plain" tensors); routed banks counted at top-k/E, the embedding at one row."""
    from dsv4.backends.mlx.qlinear import ExpertBank, QLinear
    cfg, by_form = model.config, {}
    for name, v in model.runner.weights._cache.items():
        if isinstance(v, ExpertBank):
            form, n = v.w1.mode, sum(q.nbytes for q in (v.w1, v.w2, v.w3)) * cfg.num_experts_per_tok // len(v)
        elif name == "embed.weight":
            form, n = "plain", v.nbytes // v.shape[0]
        else:
            form, n = (v.mode, v.nbytes) if isinstance(v, QLinear) else ("plain", v.nbytes)
        by_form[form] = by_form.get(form, 0) + n
    return by_form


def kernel_rates(rows: int = 2048, cols: int = 2048, reps: int = 20) -> dict:
    """Weight bytes/s of one decode-shaped matmul (x [1, cols] · Wᵀ) in each storage form MLX offers here,
    median of `reps`: which form limits the decode bandwidth ratio on this device."""
    import mlx.core as mx
    w = mx.random.normal((rows, cols), key=mx.random.key(0)) / np.sqrt(cols)
    x = mx.random.normal((1, cols), key=mx.random.key(1))
    forms = {"dense float32": (lambda: x @ w.T, w.nbytes)}
    wb = w.astype(mx.bfloat16)
    forms["dense bfloat16"] = (lambda: x.astype(mx.bfloat16) @ wb.T, wb.nbytes)
    for mode, bits in (("mxfp4", 4), ("mxfp8", 8), ("affine", 8), ("affine", 4)):
        q = mx.quantize(w, group_size=32, bits=bits, mode=mode)
        wq, sc, bi = (*q, None) if len(q) == 2 else q
        mx.eval(wq, sc, *([bi] if bi is not None else []))
        forms[f"{mode}{bits if mode == 'affine' else ''}"] = (
            lambda wq=wq, sc=sc, bi=bi, mode=mode, bits=bits: mx.quantized_matmul(
                x, wq, sc, bi, transpose=True, group_size=32, bits=bits, mode=mode),
            sum(a.nbytes for a in (wq, sc, bi) if a is not None))
    rates = {}
    for name, (fn, nbytes) in forms.items():
        mx.eval(fn())
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        rates[name] = {"ms": 1e3 * float(np.median(times)), "weight_bytes_s": nbytes / float(np.median(times))}
    return rates


def measure(path: Path, prefill: list[int], decode: int, dtype: str, budget_s: float) -> dict:
    import mlx.core as mx

    import dsv4
    ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    t0 = time.perf_counter()
    m = dsv4.load(path, backend="mlx", dtype=dtype, context=max(prefill + [256]))
    load_s = time.perf_counter() - t0
    rss_load = vm_status("VmHWM")
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
    pre, skipped = {}, {}
    for n in sorted(prefill):
        if n > m.context:
            skipped[str(n)] = f"above the model's context ({m.context} tokens)"
            continue
        if pre:
            rate = list(pre.values())[-1]          # attention grows with length: a lower bound on the time
            if n / rate > budget_s:
                skipped[str(n)] = (f"projected ≥ {n / rate:.0f} s at the {rate:.2f} tok/s measured at "
                                   f"{list(pre)[-1]} > budget {budget_s:.0f} s")
                continue
        t = time.perf_counter()
        m.step(m.new_state(1), rng.integers(3, vocab, (1, n)))
        pre[str(n)] = n / (time.perf_counter() - t)
    bw = memcpy_bandwidth()
    by_form = touched_bytes(m)
    touched = sum(by_form.values())
    rss = vm_status("VmHWM")
    return {"device": str(mx.default_device()), "dtype": dtype, "compiled_decode": m.runner.compile,
            "state_format": m.runner.state_format, "checkpoint_bytes": ckpt_bytes, "weight_bytes_held": m.runner.weights.nbytes(),
            "load_s": load_s, "decode_tok_s": 1.0 / step_s, "prefill_tok_s": pre, "prefill_skipped": skipped,
            "bytes_per_token": touched, "bytes_per_token_by_form": by_form, "weight_bw_bytes_s": touched / step_s, "memcpy_bytes_s": bw,
            "bw_ratio": touched / step_s / bw, "peak_rss_load_bytes": rss_load, "rss_load_ratio": rss_load / ckpt_bytes,
            "peak_rss_run_bytes": rss, "rss_run_ratio": rss / ckpt_bytes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,medium")
    ap.add_argument("--prefill", default="1024,8192,32768")
    ap.add_argument("--decode", type=int, default=32, help="decode steps to time")
    ap.add_argument("--medium-inter", type=int, default=768, help="expert width of medium (768: 1.88 GB)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill-budget-s", type=float, default=300.0,
                    help="skip a prefill length projected (from the previous length's rate) to take longer")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dsv4-bench"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefill = [int(x) for x in args.prefill.split(",") if x]
    if args.one:
        print(json.dumps(measure(Path(args.one), prefill, args.decode, args.dtype, args.prefill_budget_s)))
        return
    root = Path(args.cache)
    results = {"machine": platform.platform(), "python": platform.python_version(),
               "memcpy_bytes_s": memcpy_bandwidth(), "kernels_2048x2048": kernel_rates(), "configs": {}}
    for name in args.configs.split(","):
        path = checkpoint_dir(name, args.medium_inter, root)
        out = subprocess.run([sys.executable, __file__, "--one", str(path), "--prefill", args.prefill,
                              "--decode", str(args.decode), "--dtype", args.dtype,
                              "--prefill-budget-s", str(args.prefill_budget_s)],
                             capture_output=True, text=True, check=True)
        results["configs"][name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'config':8} {'ckpt MB':>8} {'decode tok/s':>12} {'prefill tok/s':>28} {'bw ratio':>8} "
          f"{'RSS/ckpt load':>13} {'RSS/ckpt run':>12}")
    for name, r in results["configs"].items():
        pre = " ".join(f"{k}:{v:.1f}" for k, v in r["prefill_tok_s"].items())
        print(f"{name:8} {r['checkpoint_bytes'] / 1e6:8.1f} {r['decode_tok_s']:12.2f} {pre:>28} "
              f"{r['bw_ratio']:8.3f} {r['rss_load_ratio']:13.3f} {r['rss_run_ratio']:12.3f}")
        for k, why in r["prefill_skipped"].items():
            print(f"  {name} prefill {k} skipped: {why}")
    print(f"\none decode matmul [1,2048]·[2048,2048]ᵀ by weight form (memcpy {results['memcpy_bytes_s'] / 1e9:.2f} GB/s):")
    for form, k in results["kernels_2048x2048"].items():
        print(f"  {form:15} {k['ms']:7.2f} ms {k['weight_bytes_s'] / 1e9:6.2f} GB/s of weights "
              f"(ratio {k['weight_bytes_s'] / results['memcpy_bytes_s']:.3f})")
    for name, r in results["configs"].items():
        forms = ", ".join(f"{f} {b / 1e6:.0f} MB" for f, b in sorted(r["bytes_per_token_by_form"].items()))
        print(f"  {name}: weights read per decoded token: {forms}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

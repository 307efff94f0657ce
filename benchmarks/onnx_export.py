"""ONNX exports: the quantized export (the default) vs the dense float32 export vs the reference backend.

Per model (the tiny checkpoint, and a medium synthetic one written here whose weights are mostly FP4
experts, as Flash's are): export time and data size against the checkpoint's bytes; then, each in its own
process (peak RSS is per process), session load time, RSS after load and at peak over the run's own
baseline (python + onnxruntime imported), prefill tokens/s for one prompt and decode tokens/s.  BLAS and
onnxruntime intra-op threads are pinned (default 1).

Cost models, next to the measured figures:
* decode time (a one-token step touches every active weight once, so it is the per-weight cost of the
  kernels that read them): per active weight, a float32 MatMul (fixed linears, float tensors), a Gemm on an
  expert row gathered from the bank (float32 export), a blocked float8 DequantizeLinear + MatMul (FP8
  linears) and the FP4 bank decode (row gather, byte→pair lookup, E8M0 scale) + Gemm (quantized experts).
  The four per-weight rates are measured here on small graphs and summed over the config's active
  weights; the rest of the step (attention, norms, routing: the same graph in both exports) is taken as
  the float32 export's measured time minus its weight term.
* memory: the data file (memory-mapped, every page read once), plus the float32 copies onnxruntime folds
  at load (the casts of BF16 tensors used by a MatMul: head, compressor and gate weights; 4 bytes each),
  plus a fixed per-session overhead (graph, kernels, arena), which the tiny model shows.

    python benchmarks/onnx_export.py [--prompt 128] [--decode 16] [--threads 1] [--models tiny,medium]
Prints a table and writes benchmarks/results/onnx.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and its name would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

OUT = Path(__file__).parent / "results" / "onnx.json"
CONTEXT = 1024
MEDIUM = dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0],
              num_attention_heads=8, head_dim=128, q_lora_rank=512, o_groups=4, o_lora_rank=256,
              index_n_heads=16, index_topk=16, n_routed_experts=64, num_experts_per_tok=4,
              moe_intermediate_size=512, max_position_embeddings=4096)


def rss(field: str = "VmRSS") -> int:
    """This process's resident bytes now (VmRSS) or at peak (VmHWM; unlike ru_maxrss, not inherited
    from the parent that started this process)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def checkpoint(model: str) -> Path:
    from dsv4.portable.config import ModelConfig
    from dsv4.portable.tiny import cache_dir, ensure_tiny, write_checkpoint
    if model == "tiny":
        return ensure_tiny("tiny")
    path = cache_dir() / "onnx-bench-medium-v2"
    if not (path / "tokenizer.json").exists():
        write_checkpoint(ModelConfig.from_dict(MEDIUM), path, seed=0)
    return path


def worker(spec: dict) -> dict:
    """One measurement in this process: load, prefill, decode (printed as JSON by `--one`)."""
    import numpy as np

    import dsv4
    import dsv4.backends.onnx  # noqa: F401 — onnxruntime counted in the baseline, as an app has it imported
    base = rss()
    t0 = time.perf_counter()
    if spec["backend"] == "onnx":
        model = dsv4.load(spec["path"], backend="onnx", context=CONTEXT, threads=spec["threads"])
    else:
        model = dsv4.load(spec["path"], backend="reference", dtype="float32", context=CONTEXT, validate=False)
    load_s = time.perf_counter() - t0
    loaded = rss() - base
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, spec["prompt"] + spec["decode"])
    state = model.new_state(1)
    t0 = time.perf_counter()
    _, state = model.step(state, ids[None, :spec["prompt"]])
    prefill_s = time.perf_counter() - t0
    steps = []
    for i in range(spec["prompt"], spec["prompt"] + spec["decode"]):
        t0 = time.perf_counter()
        _, state = model.step(state, ids[None, i:i + 1])
        steps.append(time.perf_counter() - t0)
    decode_s = float(np.median(steps)) * spec["decode"]          # the median step: the machine is shared
    peak = rss("VmHWM") - base
    return {"load_s": load_s, "rss_load": loaded, "rss_peak": peak, "prefill_tok_s": spec["prompt"] / prefill_s,
            "decode_tok_s": spec["decode"] / decode_s}


def measure(spec: dict) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(spec["threads"]), "OMP_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def active_weights(cfg) -> dict:
    """Weights one decode token reads, by kind: FP8 linears, routed experts (k per layer), 2-D float tensors
    used by a MatMul (head, compressor, gate); and the elements of the BF16 ones, which onnxruntime folds."""
    from dsv4.portable.checkpoint import EXPERTS, LINEAR, weight_schema
    n = {"linear": 0, "experts": 0, "float": 0, "folded": 0}
    for name, e in weight_schema(cfg).items():
        t = e.tensors[0]
        if name.startswith("mtp.") or name == "embed.weight":
            continue
        if e.role == LINEAR:
            n["linear"] += t.shape[0] * t.shape[1]
        elif e.role == EXPERTS:
            n["experts"] += cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size
        elif name.endswith(".weight") and len(t.shape) == 2:
            n["float"] += t.shape[0] * t.shape[1]
            n["folded"] += t.shape[0] * t.shape[1] * (t.dtype == "BF16")
    return n


def kernel_rates(threads: int) -> dict:
    """Seconds per weight of the four ways the exports read a weight in a one-token step (1024 × 1024)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    from dsv4.export.weights import E8M0_TABLE, FP4_PAIR_TABLE
    m = n = 1024
    rng = np.random.default_rng(0)
    x = h.make_tensor_value_info("x", T.FLOAT, [1, n])
    e = h.make_tensor_value_info("e", T.INT64, [])            # an input: a constant expert id would be folded
    f32 = nh.from_array(rng.standard_normal((n, m)).astype(np.float32), "w")
    bank = nh.from_array(rng.standard_normal((2, m, n)).astype(np.float32), "bank")
    e4m3 = rng.integers(0, 126, (n, m)).astype(np.uint8).tobytes()
    codes = h.make_tensor("c", T.FLOAT8E4M3FN, [n, m], e4m3, raw=True)
    packed = nh.from_array(rng.integers(0, 256, (2, m, n // 2)).astype(np.uint8), "p")
    scales = nh.from_array(rng.integers(120, 130, (2, m, n // 32)).astype(np.uint8), "s")
    tables = [nh.from_array(FP4_PAIR_TABLE, "pairs"), nh.from_array(E8M0_TABLE, "e8m0"),
              nh.from_array(np.asarray([m, n // 32, 32]), "blk"), nh.from_array(np.asarray([m, n]), "mn"),
              nh.from_array(np.asarray([-1]), "last")]
    graphs = {
        "matmul": ([h.make_node("MatMul", ["x", "w"], ["y"])], [f32]),
        "bank_gemm": ([h.make_node("Gather", ["bank", "e"], ["r"]), h.make_node("Gemm", ["x", "r"], ["y"], transB=1)],
                      [bank]),
        "dq_matmul": ([h.make_node("DequantizeLinear", ["c", "sc"], ["d"], axis=0, block_size=128),
                       h.make_node("MatMul", ["x", "d"], ["y"])],
                      [codes, nh.from_array(np.ones((n // 128, m), np.float32), "sc")]),
        "fp4_gemm": ([h.make_node("Gather", ["p", "e"], ["r"]), h.make_node("Cast", ["r"], ["ri"], to=T.INT32),
                      h.make_node("Gather", ["pairs", "ri"], ["v"]), h.make_node("Gather", ["s", "e"], ["sr"]),
                      h.make_node("Cast", ["sr"], ["si"], to=T.INT32), h.make_node("Gather", ["e8m0", "si"], ["sv"]),
                      h.make_node("Reshape", ["v", "blk"], ["vb"]), h.make_node("Unsqueeze", ["sv", "last"], ["su"]),
                      h.make_node("Mul", ["vb", "su"], ["wv"]), h.make_node("Reshape", ["wv", "mn"], ["wd"]),
                      h.make_node("Gemm", ["x", "wd"], ["y"], transB=1)], [packed, scales, *tables]),
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    rates = {}
    for name, (nodes, inits) in graphs.items():
        inputs = [x, e] if "e" in {i for node in nodes for i in node.input} else [x]
        feed = {"x": rng.standard_normal((1, n)).astype(np.float32), "e": np.asarray(1)}
        feed = {k: v for k, v in feed.items() if k in {i.name for i in inputs}}
        g = h.make_graph(nodes, name, inputs, [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
        model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess.run(None, feed)
        best = float("inf")
        for _ in range(5):                                          # the best of 5 batches: a shared machine
            t0 = time.perf_counter()
            for _ in range(10):
                sess.run(None, feed)
            best = min(best, (time.perf_counter() - t0) / 10)
        rates[name] = best / (m * n)
    return rates


def decode_model(cfg, rates: dict) -> dict:
    """Predicted seconds per decode token of each export (see the module docstring)."""
    n = active_weights(cfg)
    return {"float32": (n["linear"] + n["float"]) * rates["matmul"] + n["experts"] * rates["bank_gemm"],
            "quantized": n["linear"] * rates["dq_matmul"] + n["float"] * rates["matmul"]
            + n["experts"] * rates["fp4_gemm"]}


def run_model(model: str, prompt: int, decode: int, threads: int, rates: dict) -> dict:
    from dsv4.export import export_onnx
    from dsv4.portable.checkpoint import Checkpoint
    from dsv4.portable.config import ModelConfig
    src = checkpoint(model)
    cfg = ModelConfig.from_file(src)
    row = {"model": model, "checkpoint_bytes": Checkpoint(src).nbytes(), "runs": {}}
    tmp = Path(tempfile.mkdtemp(prefix="dsv4-onnx-bench-"))
    try:
        for weights in ("quantized", "float32"):
            t0 = time.perf_counter()
            out = export_onnx(src, tmp / weights, weights=weights, context=CONTEXT, check=False)
            data = (out / "model.onnx.data").stat().st_size
            r = {"export_s": time.perf_counter() - t0, "data_bytes": data}
            r.update(measure({"backend": "onnx", "path": str(out), "prompt": prompt, "decode": decode,
                              "threads": threads}))
            row["runs"][weights] = r
            shutil.rmtree(out)
        row["runs"]["reference"] = measure({"backend": "reference", "path": str(src), "prompt": prompt,
                                            "decode": decode, "threads": threads})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    predicted = decode_model(cfg, rates)
    rest = 1 / row["runs"]["float32"]["decode_tok_s"] - predicted["float32"]
    for name in ("quantized", "float32"):
        r = row["runs"][name]
        r["decode_s_model"], r["decode_s"] = predicted[name] + rest, 1 / r["decode_tok_s"]
    row["folded_float32_bytes"] = 4 * active_weights(cfg)["folded"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(worker(json.loads(a.one))))
        return
    rates = kernel_rates(a.threads)
    rows = [run_model(m, a.prompt, a.decode, a.threads, rates) for m in a.models.split(",")]
    mib = 1 << 20
    print(f"{'model':8} {'run':10} {'data MiB':>9} {'×ckpt':>6} {'export s':>9} {'load s':>7} {'RSS load':>9} "
          f"{'RSS peak':>9} {'peak/data':>9} {'prefill t/s':>11} {'decode t/s':>10}")
    for row in rows:
        for name, r in row["runs"].items():
            data = r.get("data_bytes")
            print(f"{row['model']:8} {name:10} {data / mib if data else 0:9.1f} "
                  f"{data / row['checkpoint_bytes'] if data else 0:6.2f} {r.get('export_s', 0):9.2f} "
                  f"{r['load_s']:7.2f} {r['rss_load'] / mib:8.1f}M {r['rss_peak'] / mib:8.1f}M "
                  f"{r['rss_peak'] / data if data else 0:9.2f} {r['prefill_tok_s']:11.1f} {r['decode_tok_s']:10.1f}")
        q, f = row["runs"]["quantized"], row["runs"]["float32"]
        print(f"{row['model']:8} decode ms/token quantized {1e3 * q['decode_s']:.1f} vs model "
              f"{1e3 * q['decode_s_model']:.1f}, float32 {1e3 * f['decode_s']:.1f}: ratio "
              f"{q['decode_s'] / f['decode_s']:.2f} (model {q['decode_s_model'] / f['decode_s']:.2f}); "
              f"folded float32 copies {row['folded_float32_bytes'] / mib:.1f} MiB")
    print("kernel ns/weight: " + ", ".join(f"{k} {v * 1e9:.2f}" for k, v in rates.items()))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                               "threads": a.threads, "prompt": a.prompt, "decode": a.decode, "context": CONTEXT,
                               "medium_config": MEDIUM, "kernel_s_per_weight": rates, "rows": rows}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

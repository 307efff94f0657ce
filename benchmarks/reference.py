"""Reference backend throughput on the tiny checkpoints: prefill and decode tokens/s per dtype.

Later backends report their speed as a ratio against these figures, measured in the same run where
possible (the machines are shared and noisy).  Prints a table and writes benchmarks/results/reference.json.

    python benchmarks/reference.py [--prompt 256] [--decode 64] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import dsv4


def measure(preset: str, dtype: str, prompt: int, decode: int, context: int) -> dict:
    model = dsv4.load(preset, dtype=dtype, context=context)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, prompt + decode)
    model.forward(ids[:8])                                   # warm caches (dequantized weights, tables)
    t0 = time.perf_counter()
    state = model.new_state(1)
    _, state = model.step(state, ids[None, :prompt])
    t1 = time.perf_counter()
    for i in range(prompt, prompt + decode):
        _, state = model.step(state, ids[None, i:i + 1])
    t2 = time.perf_counter()
    return {"model": preset, "dtype": dtype, "prompt_tokens": prompt, "decode_tokens": decode,
            "prefill_tok_s": prompt / (t1 - t0), "decode_tok_s": decode / (t2 - t1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reference.json"))
    a = ap.parse_args()
    rows = [measure(p, d, a.prompt, a.decode, a.context) for p in ("tiny", "tiny2") for d in ("float64", "float32")]
    print(f"{'model':<6} {'dtype':<8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['model']:<6} {r['dtype']:<8} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"backend": "reference", "machine": platform.machine(),
                                       "processor": platform.processor(), "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

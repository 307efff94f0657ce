"""The load path's memory: peak RSS growth while loading stays near the checkpoint's bytes.

Measured in a fresh subprocess (VmHWM from /proc, Linux only) because tracemalloc does not see MLX's
allocations and a test process's own high-water mark already holds other models.  Before bounded reads,
the mapped checkpoint pages stayed resident next to the MLX copies (growth ≈ 2–4× the checkpoint)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import dsv4, dsv4.backends.mlx  # imports (and their memory) before the baseline
from dsv4.portable.encoding import Tokenizer
Tokenizer.from_dir(sys.argv[1])   # load checks the tokenizer: a fixed cost, not the weights' (parsed once here)
base = status("VmHWM")
m = dsv4.load(sys.argv[1], backend="mlx", dtype="float32", context=64)
print(json.dumps({"growth": status("VmHWM") - base, "held": m.runner.weights.nbytes()}))
"""


def _load_growth(path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("converted", [False, True], ids=["official", "converted"])
def test_load_peak_rss_near_checkpoint_bytes(ckpt, tmp_path, converted):
    from dsv4.backends.mlx.convert import convert
    path = convert(ckpt("tiny2"), tmp_path / "mlx") if converted else ckpt("tiny2")
    ckpt_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    r = _load_growth(path)
    assert r["held"] >= 0.9 * ckpt_bytes            # the weights really were loaded (nothing left lazy)
    assert r["growth"] <= 1.3 * ckpt_bytes, (r, ckpt_bytes)

"""examples/onnx_plain.py: plain numpy + onnxruntime + tokenizers reproduce the reference's greedy tokens
and dsv4's own ONNX runner, growing the state through capacity buckets."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

import dsv4

CONTEXT = 512          # state capacity of the test exports (small: the reference is slow at 4096)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "onnx_plain.py"


def reference_greedy(ckpt_dir, prompt, n):
    model = dsv4.load(ckpt_dir, backend="reference", dtype="float64", context=CONTEXT)
    state, ids, out = model.new_state(), np.asarray([prompt]), []
    for _ in range(n):
        logits, _ = model.runner.step(state, ids)
        out.append(int(np.argmax(logits[0, -1])))
        ids = np.asarray([[out[-1]]])
    return out


def test_example_imports_nothing_but_numpy_onnxruntime_tokenizers():
    tree = ast.parse(EXAMPLE.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"argparse", "json", "pathlib", "numpy", "onnxruntime", "tokenizers"}
    assert len(EXAMPLE.read_text().splitlines()) <= 75


def test_example_greedy_tokens_equal_reference(tiny_any, onnx_export, rand_ids):
    prompt = [int(t) for t in rand_ids(23, seed=31)]
    want = reference_greedy(tiny_any, prompt, 12)
    out = subprocess.run([sys.executable, str(EXAMPLE), str(onnx_export(tiny_any, CONTEXT)), "--ids",
                          ",".join(map(str, prompt)), "--max-new", "12"],
                         capture_output=True, text=True, check=True).stdout
    got = [int(t) for t in out.splitlines()[0].removeprefix("ids: ").split(",")]
    assert got[:len(want)] == want[:len(got)] and (len(got) == 12 or got[-1] == 1)


def test_example_runs_on_a_text_prompt(tiny_dir, onnx_export):
    out = subprocess.run([sys.executable, str(EXAMPLE), str(onnx_export(tiny_dir, CONTEXT)), "hello there", "--max-new", "4"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("ids: ") and len(out[0][5:].split(",")) >= 1


def test_example_agrees_with_dsv4_runner_across_capacity_buckets(tiny_any, onnx_export, rand_ids):
    """A prompt just under the smallest bucket, then decodes past it: the example's own buffer growth and
    in-place row writes give the same greedy tokens as dsv4's runner (whose state grows the same way)."""
    spec = importlib.util.spec_from_file_location("onnx_plain", EXAMPLE)
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    out = onnx_export(tiny_any, CONTEXT)
    prompt = [int(t) for t in rand_ids(120, seed=32)]
    model = dsv4.load(out, backend="onnx", context=CONTEXT)
    state, ids, want = model.new_state(), np.asarray([prompt]), []
    for _ in range(16):
        logits, state = model.step(state, ids)
        want.append(int(np.argmax(logits[0, -1])))
        ids = np.asarray([[want[-1]]])
    assert model.state_info(state)["capacity"] == 256
    assert plain.greedy(out, prompt, 16) == want

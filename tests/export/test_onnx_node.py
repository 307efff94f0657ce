"""examples/onnx_node: the Node.js program (onnxruntime-node + @huggingface/tokenizers) prints what the
Python example prints — the same greedy ids and text — and its tokenizer encodes like `tokenizers`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dsv4.portable.encoding.tokenizer import official_tokenizer_path

CONTEXT = 512          # state capacity of the test exports (shared with test_onnx_export)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NODE_DIR = EXAMPLES / "onnx_node"

if shutil.which("node") is None:
    pytest.skip("node is not installed (.ci/run installs it and the example's npm packages)", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def npm_packages():
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").exists():
        pytest.fail(f"{NODE_DIR} has no node_modules: run `npm ci` there (.ci/run does)")


def run(cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=NODE_DIR, timeout=300)


def both(export, *args):
    node = run(["node", "generate.mjs", str(export), *args]).stdout
    python = run([sys.executable, str(EXAMPLES / "onnx_plain.py"), str(export), *args]).stdout
    return node, python


def test_greedy_ids_equal_the_python_examples_across_a_capacity_bucket(tiny_any, onnx_export, rand_ids):
    """120 prompt ids then 16 decodes: the state grows past the 128-token bucket in both programs."""
    prompt = ",".join(str(int(t)) for t in rand_ids(120, seed=51))
    node, python = both(onnx_export(tiny_any, CONTEXT), "--ids", prompt, "--max-new", "16")
    assert node.startswith("ids: ") and len(node.splitlines()[0][5:].split(",")) >= 1
    assert node == python


def test_text_prompts_give_the_python_examples_output(tiny_dir, onnx_export):
    export = onnx_export(tiny_dir, CONTEXT)
    for prompt in ("hello there", "<｜User｜>what is <think> 2+2</think>?\n"):
        node, python = both(export, prompt, "--max-new", "6")
        assert node == python and node.startswith("ids: ")


@pytest.mark.parametrize("which", ["tiny", "v4"])
def test_the_js_tokenizer_encodes_and_decodes_like_tokenizers(tiny_dir, which):
    path = tiny_dir / "tokenizer.json" if which == "tiny" else official_tokenizer_path()
    texts = ["hello there", "Hello, World! 123 4567", "  two  spaces\n\nand\ttabs", "héllo wörld — ✓ 日本語 😀",
             "<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜>", "<｜User｜>a<｜Assistant｜><think>", "<|endoftext|></s>",
             "def f(x):\n    return x**2  # comment"]
    tok = Tokenizer.from_file(str(path))
    want = [[ids, tok.decode(ids)] for ids in (tok.encode(t, add_special_tokens=False).ids for t in texts)]
    config = path.parent / "tokenizer_config.json"
    script = f"""
import fs from "node:fs";
import {{ Tokenizer }} from "@huggingface/tokenizers";
const config = {json.dumps(str(config))};
const tok = new Tokenizer(JSON.parse(fs.readFileSync({json.dumps(str(path))}, "utf8")),
                          fs.existsSync(config) ? JSON.parse(fs.readFileSync(config, "utf8")) : {{}});
console.log(JSON.stringify({json.dumps(texts)}.map((t) => {{
  const ids = tok.encode(t, {{ add_special_tokens: false }}).ids;
  return [ids, tok.decode(ids, {{ skip_special_tokens: true }})];
}})));
"""
    got = json.loads(run(["node", "--input-type=module", "-e", script]).stdout)
    assert got == want


def test_an_export_of_another_version_is_refused(tiny_dir, onnx_export, tmp_path):
    export = tmp_path / "old"
    shutil.copytree(onnx_export(tiny_dir, CONTEXT), export)
    man = json.loads((export / "manifest.json").read_text())
    (export / "manifest.json").write_text(json.dumps({**man, "version": 2}))
    r = run(["node", "generate.mjs", str(export), "--ids", "5,6"], check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (f"error: {export} is a dsv4-onnx export of version 2; this example reads version 3 "
                                f"(re-export it with `dsv4 export onnx CHECKPOINT_DIR NEW_DIR`)")

"""Greedy generation on a dsv4 ONNX export with nothing but numpy, onnxruntime and tokenizers.

    python examples/onnx_plain.py EXPORT_DIR "prompt text" [--max-new 32]
    python examples/onnx_plain.py EXPORT_DIR --ids 5,17,300 [--max-new 32]

Everything the loop needs is in manifest.json: the state buffers (shape, dtype, initial fill) and the
graph's input/output names.  The contract is "state in, updated state out", the same for the whole
prompt and for each generated token, so this loop is all another app needs to use an export.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def greedy(export_dir, prompt_ids, max_new, eos=None):
    d = Path(export_dir)
    man = json.loads((d / "manifest.json").read_text())
    g = man["graphs"]["main"]
    if len(prompt_ids) + max_new > man["max_len"]:
        raise SystemExit(f"prompt + {max_new} new tokens exceed the exported context of {man['max_len']}")
    sess = ort.InferenceSession(str(d / g["file"]), providers=["CPUExecutionProvider"])
    state = {e["input"]: np.full([1 if s == "batch" else s for s in e["shape"]], float(e["fill"]), e["dtype"])
             for e in g["state"]}
    names = [g["outputs"]["logits"]] + [e["output"] for e in g["state"]]
    ids, out = np.asarray([prompt_ids], dtype=np.int64), []
    for _ in range(max_new):
        logits, *new = sess.run(names, {g["inputs"]["ids"]: ids, **state})
        state = {e["input"]: v for e, v in zip(g["state"], new)}
        out.append(int(np.argmax(logits[0, -1])))
        if out[-1] == eos:
            break
        ids = np.asarray([[out[-1]]], dtype=np.int64)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("prompt", nargs="?", default="")
    ap.add_argument("--ids", help="comma-separated prompt token ids instead of text")
    ap.add_argument("--max-new", type=int, default=32)
    a = ap.parse_args()
    cfg = json.loads((Path(a.export_dir) / "config.json").read_text())
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(a.export_dir) / "tokenizer.json"))
    ids = [int(t) for t in a.ids.split(",")] if a.ids else [cfg["bos_token_id"]] + tok.encode(
        a.prompt, add_special_tokens=False).ids
    out = greedy(a.export_dir, ids, a.max_new, cfg["eos_token_id"])
    print("ids:", ",".join(map(str, out)))
    print(tok.decode(out))


if __name__ == "__main__":
    main()

"""Greedy generation on a dsv4 ONNX export with nothing but numpy, onnxruntime and tokenizers.

    python examples/onnx_plain.py EXPORT_DIR "prompt text" [--max-new 32]
    python examples/onnx_plain.py EXPORT_DIR --ids 5,17,300 [--max-new 32]

manifest.json names the graph's inputs/outputs and the state buffers (shape, dtype, which grow with the
capacity).  A step returns only the rows it wrote, which the loop writes into its buffers in place; before
a step would overflow the capacity, the growing buffers are re-allocated larger, keeping the rows held.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def fresh(g, cap, old=None):
    """Zero buffers for capacity `cap`; with `old`, its rows kept (except each growing buffer's spill row)."""
    st = {}
    for e in g["state"]:
        shape = [1 if d == "batch" else cap // e["grows"] + 1 if isinstance(d, str) else d for d in e["shape"]]
        st[e["name"]] = old[e["name"]] if old and not e["grows"] else np.zeros(shape, e["dtype"])
        if old and e["grows"]:
            st[e["name"]][:, :old[e["name"]].shape[1] - 1] = old[e["name"]][:, :-1]
    return st


def greedy(export_dir, prompt_ids, max_new, eos=None):
    d = Path(export_dir)
    man = json.loads((d / "manifest.json").read_text())
    g, cap, mult = man["graphs"]["main"], man["capacity"]["min"], man["capacity"]["multiple"]
    if len(prompt_ids) + max_new > man["max_len"]:
        raise SystemExit(f"prompt + {max_new} new tokens exceed the exported context of {man['max_len']}")
    sess = ort.InferenceSession(str(d / g["file"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    state, ids, out = fresh(g, cap), np.asarray([prompt_ids], dtype=np.int64), []
    for _ in range(max_new):
        if (need := int(state["start"].max()) + ids.shape[1]) > cap:      # grow (capacity: a multiple of mult)
            state = fresh(g, (cap := max(2 * cap, -(-need // mult) * mult)), state)
        res = dict(zip(names, sess.run(names, {g["inputs"]["ids"]: ids,
                                               **{e["input"]: state[e["name"]] for e in g["state"]}})))
        for e in g["state"]:                                              # write the new rows in place
            if "output" in e:
                state[e["name"]] = res[e["output"]]
            else:
                state[e["name"]][np.arange(ids.shape[0])[:, None], res[e["index"]]] = res[e["rows"]]
        out.append(int(np.argmax(res[g["outputs"]["logits"]][0, -1])))
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

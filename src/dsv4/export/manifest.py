"""The `manifest.json` of an exported directory: what a runtime needs to drive the ONNX graphs.

Why a manifest and not just the graphs' IO: the state buffers carry meaning a graph signature cannot
(which buffers grow with the capacity and how, which outputs are the new rows of which buffer, which
capacities the graphs accept), and a plain onnxruntime app (examples/onnx_plain.py with json + numpy,
examples/onnx_node/generate.mjs with typed arrays) must be able to build, grow and update a state from it
alone.  This module is the one piece of `export` the ONNX backend imports.

Layout (format "dsv4-onnx", version 3; `read_manifest` refuses any other version with the command that
re-exports the model):
    dtype, weights, opset, max_len activation dtype (float32 unless a dense half-precision export), weight mode
                                   (`quantization` describes it), ONNX opset, longest sequence in tokens
    source                         the checkpoint directory the export was made from (for a re-export)
    capacity                       {min, multiple}: the entry buffers may be sized for any capacity C that is
                                   a multiple of `multiple` and at least `min` (tokens held ≤ C ≤ max_len
                                   rounded up to `multiple`); the graph's shapes follow the buffers fed
    config                         the config.json written next to the model (max_position_embeddings = max_len)
    graphs.main / graphs.mtp       {file, inputs: {ids, streams?}, outputs: {logits, streams?}, state: [...]}
    state entries                  {name, input, shape, dtype, fill, grows, then output | rows + index}:
                                   shape has "batch" first; a buffer with grows = m > 0 has C // m + 1 rows
                                   (axis 1, dynamic), the others a static shape.  A fresh state holds `fill`
                                   (0 everywhere).  `output` (only `start`) replaces the buffer; `rows`
                                   [batch, M, ...] and `index` [batch, M] int64 are the step's new rows, which
                                   the caller writes in place: buf[b, index[b, i]] = rows[b, i] (the last row
                                   is a spill row that may be written more than once and is never read).
    data                           {file, bytes}: the shared external-data file and its exact size
    tokenizer                      files copied from the checkpoint
    quantization                   how the weights are stored and decoded (`quantization`)

Growing a state to a larger capacity keeps rows 0..R−2 of each growing buffer (R its old row count) and
fills the rest, spill row included, with `fill`.  A step: feed `ids` (int64 [batch, seq]) and every
state entry's `input`, read `logits` (float32 [batch, seq, vocab]) and the entries' outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..portable.layout import EXPORT_FORMAT as FORMAT, MANIFEST   # how `dsv4.load` recognises an export

VERSION = 3


class ExportError(ValueError):
    """An export directory that cannot be used (or written) as asked; the message says what is wrong."""


def buffer_ratio(cfg, name: str) -> int:
    """The compress ratio of the layer a state buffer belongs to (`L3.entries` → layer 3, `mtp.…` → the
    MTP block); the rows of a growing buffer are capacity // ratio + 1."""
    key = name.split(".")[0]
    return cfg.ratio(cfg.num_hidden_layers if key == "mtp" else int(key[1:]))


def state_entries(cfg, specs, batch_label: str = "batch") -> list[dict]:
    """Manifest entries for `portable.cache` buffers (state_spec order; shapes past the batch axis are
    taken from `specs` except the dynamic row axis of growing buffers)."""
    out = []
    for b in specs:
        m = buffer_ratio(cfg, b.name) if b.grows else 0
        shape = [batch_label, *b.shape[1:]]
        if m:
            shape[1] = f"capacity/{m}+1"
        e = {"name": b.name, "input": f"past.{b.name}", "shape": shape,
             "dtype": "int64" if b.kind == "int" else "float32", "fill": 0, "grows": m}
        if b.kind == "int":
            e["output"] = f"present.{b.name}"
        else:
            e["rows"], e["index"] = f"present.{b.name}.rows", f"present.{b.name}.index"
        out.append(e)
    return out


def quantization(weights: str) -> dict:
    """The `quantization` field: how an app finds and decodes the stored weights (the graphs do it)."""
    if weights != "quantized":
        return {"weights": weights, "linears": f"dense {weights}, stored [in, out] (name suffix .T)",
                "experts": f"<layer>.ffn.experts.w1|w2|w3: dense {weights} [E, out, in]"}
    return {"weights": "quantized",
            "linears": "FP8: <name>.weight.T float8e4m3fn codes [in, out] (<name>.weight: [out, in]) and "
                       "<name>.scale uint8 E8M0 [ceil(out/128), ceil(in/128)]; w = e4m3(code) * 2^(scale - 127) per "
                       "128x128 block, decoded by DequantizeLinear(block_size=128)",
            "experts": "<layer>.ffn.experts.w1|w2|w3.weight uint8 [E, out, in/2] packed e2m1 (low nibble = even "
                       "input) and .scale uint8 E8M0 [E, out, in/32]; w = e2m1(nibble) * 2^(scale - 127) per 32 "
                       "inputs (-Base checkpoints: uint8 e4m3 codes [E, out, in] and float32 128x128 block "
                       "scales); decoded per selected expert inside the MoE Loop",
            "float": "BF16 and F32 tensors as stored (BF16 cast to float32 where used); id tables int64",
            "compute": "float32; the decoded values equal the checkpoint's dequantized weights exactly"}


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (Path(out_dir) / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=2))


def read_manifest(export_dir) -> dict:
    """The manifest of an export directory, after checking that every file it names is present and whole."""
    d = Path(export_dir)
    p = d / MANIFEST
    if not p.exists():
        raise ExportError(f"{d} is not a dsv4 ONNX export: no {MANIFEST} (create one with `dsv4 export onnx`)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{p}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        src = m.get("source") or "CHECKPOINT_DIR"
        raise ExportError(f"{d} is a {m.get('format')!r} export of version {m.get('version')!r}; this dsv4 reads "
                          f"version {VERSION}: re-export it with `dsv4 export onnx {src} NEW_DIR`")
    for key in ("dtype", "max_len", "capacity", "config", "graphs", "data"):
        if key not in m:
            raise ExportError(f"{p}: missing field {key!r} (re-export the model)")
    for name, graph in m["graphs"].items():
        if not (d / graph["file"]).exists():
            raise ExportError(f"{d}: the {name} graph file {graph['file']} named in {MANIFEST} is missing")
    data = d / m["data"]["file"]
    if not data.exists():
        raise ExportError(f"{d}: external weight data {m['data']['file']} is missing (copy it next to the "
                          f"graph files; it holds every weight)")
    size = data.stat().st_size
    if size != m["data"]["bytes"]:
        raise ExportError(f"{d}: external weight data {m['data']['file']} has {size} bytes, the manifest "
                          f"expects {m['data']['bytes']} (truncated or from another export)")
    return m


def check_config(m: dict, cfg_dict: dict, where) -> None:
    """Raise if the config the caller loaded differs from the one the graphs were exported with."""
    diff = sorted(k for k in set(m["config"]) | set(cfg_dict) if m["config"].get(k) != cfg_dict.get(k))
    if diff:
        shown = ", ".join(f"{k}: export {m['config'].get(k)!r} vs config.json {cfg_dict.get(k)!r}" for k in diff[:5])
        raise ExportError(f"{where}: config.json does not match the exported graphs ({shown}); re-export "
                          f"the model instead of editing config.json")

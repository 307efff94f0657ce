"""The `manifest.json` of an exported directory: what a runtime needs to drive the ONNX graphs.

Why a manifest and not just the graphs' IO: the state buffers carry meaning a graph signature cannot
(initial fill values such as −inf, which buffers are activations, how many tokens the state can hold),
and a plain onnxruntime app (examples/onnx_plain.py) must be able to build a fresh state from it with
nothing but json + numpy.  This module is the one piece of `export` the ONNX backend imports.

Layout (format "dsv4-onnx", version 1):
    dtype, opset, max_len          export dtype, ONNX opset, state capacity in tokens
    config                         the config.json written next to the model (max_position_embeddings = max_len)
    graphs.main / graphs.mtp       {file, inputs: {ids, streams?}, outputs: {logits, streams?}, state: [...]}
    state entries                  {name, input, output, shape (first entry "batch"), dtype, fill}
    data                           {file, bytes}: the shared external-data file and its exact size
    tokenizer                      files copied from the checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT, VERSION = "dsv4-onnx", 1
MANIFEST = "manifest.json"


class ExportError(ValueError):
    """An export directory that cannot be used (or written) as asked; the message says what is wrong."""


def state_entries(specs, batch_label: str = "batch") -> list[dict]:
    """Manifest entries for `portable.cache` buffers, in state_spec order."""
    return [{"name": b.name, "input": f"past.{b.name}", "output": f"present.{b.name}",
             "shape": [batch_label, *b.shape[1:]], "dtype": "int64" if b.kind == "int" else "float32",
             "fill": repr(float(b.fill)) if b.kind != "int" else "0"} for b in specs]


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
        raise ExportError(f"{p}: format {m.get('format')!r} version {m.get('version')!r}; this dsv4 reads "
                          f"{FORMAT!r} version {VERSION} (re-export the model)")
    for key in ("dtype", "max_len", "config", "graphs", "data"):
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

"""Export a V4 checkpoint to ONNX: the portable graph recorded by `OnnxOps`, weights as external data.

One graph serves prefill and decode at every state capacity: `input_ids` [batch, seq] with both sizes
dynamic, the state buffers of `portable/cache.py` as inputs (`past.*`, in `state_spec` order; `past.start`
holds each sequence's position), and as outputs only what the step wrote: `present.start`, and per
buffer its new rows `present.<name>.rows` [batch, M, ...] with their row indices `present.<name>.index`
[batch, M] (M = seq for the rings, ⌈seq/m⌉ for compressed entries), which the runtime writes into its
buffers in place.  A decode step's state traffic is therefore O(1) rows, whatever the capacity.

The entry buffers' row count is a dynamic axis: capacity C (a multiple of MIN_CAPACITY) gives C // m + 1
rows for a ratio-m layer, so the runtime grows a state through the capacity buckets with one export.
The graph reads C from the first growing buffer's shape.  The indexer's top-k width is index_topk at
every capacity (`OnnxOps.indexer_topk` pads the candidates so TopK always has that many columns).
Attention and the indexer read only the entry rows some query sees (`OnnxOps.trim`), so their cost
follows the tokens held, not C.

`logits` are [batch, seq, vocab] float32.  With MTP, the main graph also returns `hidden_streams` and
`mtp.onnx` takes them with the next token ids and its own state.  Only standard-domain operators of
opset 21 are emitted.

Weights (`weights.py`): "quantized" (the default) keeps the checkpoint's FP8/FP4/BF16 bytes and decodes
them in the graph (exactly: the float32 export's logits, at the checkpoint's size); "float32", "float16"
or "bfloat16" store dense weights, the half-precision ones also rounding activations like the
reference's bf16 mode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from ..portable import cache, graph
from ..portable.checkpoint import Checkpoint
from ..portable.config import ModelConfig
from .manifest import MANIFEST, ExportError, quantization, state_entries, write_manifest
from .onnx_ops import OnnxOps, RowWrite
from .symbolic import FLOAT, INT64, Graph, Sym, TraceError
from .weights import WEIGHTS, ExportWeights, ExternalData, TensorSource

OPSET = 21
DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CAPACITY_MULTIPLE = cache.MIN_CAPACITY        # every capacity bucket is a multiple of it (and of every ratio)


def _capacity(g: Graph, cfg: ModelConfig, entries: list):
    """The state capacity as a Dim read from the first growing buffer's rows (C // m + 1); a graph without
    growing buffers (the MTP block) never uses it."""
    first = next((e for e in entries if e["grows"]), None)
    if first is None:
        return CAPACITY_MULTIPLE
    rows = g.dim_of(Sym(g, first["input"], (), FLOAT), 1)
    blocks = g.atom("FloorDiv", (rows - 1) * first["grows"], CAPACITY_MULTIPLE)      # C / CAPACITY_MULTIPLE
    return blocks * CAPACITY_MULTIPLE


def compute_dtype(weights: str) -> str:
    """The activation dtype of an export: float32 unless the weights are a dense half-precision dtype."""
    return "float32" if weights == "quantized" else weights


def _record(cfg: ModelConfig, data: ExternalData, weights: str, mtp: bool, streams_out: bool):
    """Record the main forward (mtp=False) or the MTP block; returns (ModelProto, IO description)."""
    g = Graph("dsv4_mtp" if mtp else "dsv4_main")
    o, W = OnnxOps(g, compute_dtype(weights)), ExportWeights(g, data)
    hc, dim = cfg.hc_mult, cfg.hidden_size
    g.add_input("input_ids", INT64, ["batch", "seq"])
    ids = Sym(g, "input_ids", (), INT64)
    b, s = g.dim_of(ids, 0), g.dim_of(ids, 1)
    ids.shape = (b, s)
    io = {"inputs": {"ids": "input_ids"}, "outputs": {"logits": "logits"}}
    entries = state_entries(cfg, cache.spec_for(cfg, 1, CAPACITY_MULTIPLE, mtp=mtp))
    types = [INT64 if e["dtype"] == "int64" else FLOAT for e in entries]
    for e, t in zip(entries, types):
        g.add_input(e["input"], t, e["shape"])
    capacity = _capacity(g, cfg, entries)
    specs = cache.spec_for(cfg, b, capacity, mtp=mtp)       # shapes in Dims: (b, C // m + 1, ...) where they grow
    bufs = {sp.name: Sym(g, e["input"], sp.shape, t) for sp, e, t in zip(specs, entries, types)}
    state = cache.State(cfg, bufs, capacity, "bf16", mtp)
    live = data.source.live_head
    head = None if live is None else graph.HeadRows.of(o, W["head.weight"], live)
    if mtp:
        g.add_input("hidden_streams", FLOAT, ["batch", "seq", hc, dim])
        io["inputs"]["streams"] = "hidden_streams"
        logits, streams = graph.mtp_forward(o, W, cfg, state, Sym(g, "hidden_streams", (b, s, hc, dim), FLOAT),
                                            ids, with_streams=True, head=head)
        g.add_output("output_streams", streams, ["batch", "seq", hc, dim])      # to chain drafts on
        io["outputs"]["streams"] = "output_streams"
    else:
        logits, streams = graph.forward(o, W, cfg, state, ids, head)
    g.add_output("logits", logits, ["batch", "seq", cfg.vocab_size])
    for e in entries:
        new = state.buffers[e["name"]]
        if "output" in e:
            g.add_output(e["output"], new, e["shape"])
            continue
        if not isinstance(new, RowWrite):
            raise TraceError(f"the step did not write state buffer {e['name']!r}")
        m = f"ceil(seq/{e['grows']})" if e["grows"] else "seq"
        g.add_output(e["rows"], new.rows, ["batch", m, *e["shape"][2:]])
        g.add_output(e["index"], new.index, ["batch", m])
    if streams_out:
        g.add_output("hidden_streams", streams, ["batch", "seq", hc, dim])
        io["outputs"]["streams"] = "hidden_streams"
    io["state"] = entries
    return g.model(OPSET), io


def _total(src: TensorSource, mtp: bool) -> int:
    return sum(src.entry_bytes(n) for n in src.used(mtp))


def estimate_size(src_dir, weights: str = "quantized", mtp: bool = True) -> int:
    """Bytes the export's weight data will take (the graphs themselves add well under 1%)."""
    cfg = ModelConfig.from_file(src_dir)
    return _total(TensorSource(cfg, Checkpoint(src_dir), weights), mtp and cfg.num_nextn_predict_layers > 0)


def export_onnx(src_dir, out_dir, weights: str = "quantized", context: int | None = None, mtp: bool = True,
                progress=None, overwrite: bool = False, check: bool = True) -> Path:
    """Export the checkpoint at `src_dir` into `out_dir`; returns `out_dir`.

    weights: "quantized" (the checkpoint's own FP8/FP4 bytes, decoded in the graph) or a dense dtype
        "float32" | "float16" | "bfloat16" (see the module docstring).
    context: the longest sequence in tokens (default min(max_position_embeddings, 16384), as `dsv4.load`);
        states grow with the tokens held up to it, one graph for every capacity.
    mtp: also export the MTP block as `mtp.onnx` (when the checkpoint has one).
    progress: called as progress(bytes_written, bytes_total) while weights are written.
    """
    if weights not in WEIGHTS:
        raise ExportError(f"export weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    src, out = Path(src_dir), Path(out_dir)
    cfg = ModelConfig.from_file(src)
    ckpt = Checkpoint(src)
    ckpt.validate(cfg)
    max_len = int(context or min(cfg.max_position_embeddings, 16384))
    if not 0 < max_len <= cfg.max_position_embeddings:
        raise ExportError(f"context must be in 1..{cfg.max_position_embeddings}, got {max_len}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty; choose another directory or pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, "model.onnx", "mtp.onnx", DATA_FILE):
        (out / stale).unlink(missing_ok=True)
    mtp = mtp and cfg.num_nextn_predict_layers > 0
    source = TensorSource(cfg, ckpt, weights)
    total = _total(source, mtp)
    data = ExternalData(out / DATA_FILE, source, progress, total)
    graphs = {}
    try:
        for name, file, is_mtp in [("main", "model.onnx", False)] + ([("mtp", "mtp.onnx", True)] if mtp else []):
            model, io = _record(cfg, data, weights, is_mtp, streams_out=mtp and not is_mtp)
            (out / file).write_bytes(model.SerializeToString())
            graphs[name] = {"file": file, **io}
    finally:
        data.close()
    if progress:
        progress(total, total)
    cfg_dict = {**cfg.to_dict(), "max_position_embeddings": max_len}
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    tokenizer = [f for f in TOKENIZER_FILES if (src / f).exists()]
    for f in tokenizer:
        shutil.copy(src / f, out / f)
    write_manifest(out, {"dtype": compute_dtype(weights), "weights": weights, "source": str(src.resolve()),
                         "opset": OPSET, "max_len": max_len,
                         "capacity": {"min": CAPACITY_MULTIPLE, "multiple": CAPACITY_MULTIPLE}, "config": cfg_dict,
                         "graphs": graphs, "data": {"file": DATA_FILE, "bytes": data.offset},
                         "tokenizer": tokenizer, "quantization": quantization(weights)})
    if check:
        for g in graphs.values():
            onnx.checker.check_model(str(out / g["file"]))
    return out

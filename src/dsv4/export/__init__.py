"""dsv4.export: the portable V4 graph lowered to ONNX.

Design (why a recording `Ops` rather than torch.onnx over the CUDA backend): `export.onnx_ops.OnnxOps`
implements the op interface by appending standard ONNX nodes, and `portable/graph.py` is run once on
symbolic tensors (`export.symbolic`).  The exported graph is therefore the portable graph itself —
window + CSA top-k + HCA + sink attention exactly as the reference computes them — with no second
description to drift, and exporting needs only `onnx` (no torch, no GPU).  Batch, sequence length and
the state capacity stay dynamic because sizes derived from them are tracked as symbolic `Dim`s, so one
export serves every capacity bucket up to its context.  A step outputs only the state rows it wrote
(and their row indices), which the runtime writes into its buffers in place.  Weights stream into one
external-data file (`export.weights`), so models far beyond protobuf's 2 GB limit export in bounded
memory; by default they keep the checkpoint's FP8/FP4 bytes, decoded in the graph, so an export is the
checkpoint's size and a runtime holds it at that size.

Entry points: `export_onnx(src_dir, out_dir, weights=..., context=..., mtp=..., progress=...)` and
`estimate_size(src_dir, weights, mtp)`; `manifest` is the directory format (and the contract) the ONNX
backend and the examples read.
"""

from .manifest import ExportError
from .onnx_export import estimate_size, export_onnx

__all__ = ["ExportError", "estimate_size", "export_onnx"]

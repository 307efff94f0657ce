"""What dsv4 knows about each built-in backend without importing it (torch alone takes seconds to import):
the packages it imports, which tell whether it is installed, and how it holds its weights per role of the
checkpoint schema (`portable.weights.Holding`), which memory estimates (`dsv4 info`, the CLI's check before
loading) turn into bytes.  Each holding describes its backend's weight store; the backends' tests hold
`held_bytes` to the bytes a loaded tiny model really holds.
"""

import importlib.util

from ..portable.weights import Holding

REQUIRES = {"reference": (), "cpu": ("numba", "threadpoolctl"), "mlx": ("mlx",), "cuda": ("torch",),
            "onnx": ("onnxruntime", "onnx")}

HOLDINGS = {
    # portable.reference.NumpyWeights: the checkpoint memory-mapped, quantized weights read in place and
    # dequantized per use (dense copies cached up to 1 GiB), float tensors decoded to float32/64, int64 ids
    "reference": Holding(linear="mapped", plain="compute", fp32="compute", table=8, min_float=4, mapped=True,
                         dense_cache=1 << 30),
    # backends.cpu.weights: codes and float matrices as stored (read into memory), scales float32, the other
    # float tensors in float32, int64 ids
    "cpu": Holding(scales="float32", plain="matrices", fp32="matrices", table=8, min_float=4),
    # backends.mlx.weights: FP4 and FP8 codes as stored, FP8 block scales repeated per 32 inputs (mxfp8),
    # float tensors in their stored dtype except the FP32 role, int32 ids
    "mlx": Holding(scales="per32", plain="stored", fp32="float32", table=4),
    # backends.cuda.weights: codes as stored with float32 scales, float tensors in the compute dtype (float32
    # also for bfloat16 runs, which round activations to bf16 but compute in float32)
    "cuda": Holding(scales="float32", plain="compute", fp32="compute", table=8, min_float=4),
    # an ONNX export (export.weights): every linear dense in the export dtype, float32 tensors stay float32
    "onnx": Holding(linear="dense", plain="widest", fp32="widest", table=8),
}
UNDECLARED = Holding(plain="stored", fp32="stored")     # a registered backend that declares nothing


def installed(name: str) -> bool:
    """Every package the built-in backend `name` imports can be found (nothing is imported)."""
    return all(importlib.util.find_spec(m) is not None for m in REQUIRES[name])

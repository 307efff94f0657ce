"""dsv4.backends.cuda: DeepSeek V4 on torch (CUDA, or the CPU when no GPU is present) with Triton kernels.

`dsv4.load(path, backend="cuda", dtype="float32")` builds a `CudaRunner`; see `ops.py` for the op and
kernel paths, `weights.py` for the quantized weight store and `runner.py` for chunked prefill and
CUDA-graph decode.
"""

from ...portable.runtime import register_backend
from .runner import CudaRunner, make_runner

__all__ = ["CudaRunner", "make_runner"]

register_backend("cuda", make_runner)

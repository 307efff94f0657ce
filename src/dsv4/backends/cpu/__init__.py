"""dsv4.backends.cpu — DeepSeek V4 on a CPU at the speed of reading its weights.

`CpuOps` (ops.py) is the NumPy float32 op set whose linear and expert products run kernels that read the
FP8/FP4/BF16 weights as stored and decode them exactly inside the product (kernels.py, numba + LLVM IR);
weights.py holds the weights at their stored size; runner.py bounds the threads.
"""

from ...portable.runtime import register_backend
from .runner import CpuRunner, make_runner

__all__ = ["CpuRunner", "make_runner"]

register_backend("cpu", make_runner)

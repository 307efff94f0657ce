"""dsv4.backends.mlx — DeepSeek V4 on MLX (Metal on Apple silicon, the CPU elsewhere).

The portable graph runs on `MlxOps` (ops.py); checkpoint weights are kept in compact MLX quantized forms
(qlinear.py, weights.py); `MlxRunner` compiles the single-token decode step (runner.py); `convert`
writes an MLX-ready directory that loads with no further conversion (convert.py).
"""

from ...portable.runtime import register_backend
from .runner import MlxRunner, make_runner

__all__ = ["MlxRunner", "make_runner"]

register_backend("mlx", make_runner)

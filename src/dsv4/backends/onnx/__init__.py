"""dsv4.backends.onnx: run an exported directory (`dsv4 export onnx`) on onnxruntime."""

from ...portable.runtime import register_backend
from .runner import OnnxRunner, default_providers, make_runner

__all__ = ["OnnxRunner", "default_providers", "make_runner"]

register_backend("onnx", make_runner, reads_checkpoint=False)

"""dsv4.backends.onnx: run an exported directory (`dsv4 export onnx`) on onnxruntime."""

from .runner import OnnxRunner, default_providers, make_runner

__all__ = ["OnnxRunner", "default_providers", "make_runner"]

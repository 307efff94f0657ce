"""dsv4.backends.onnx."""

"""V4 described once: config, op interface, graph, cache and checkpoint schemas, the NumPy reference,
generation, sampling and the chat encoding.  Nothing here imports a backend (mlx, torch, onnx)."""

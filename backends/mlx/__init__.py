"""dsv4.backends.mlx."""

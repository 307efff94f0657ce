"""dsv4.backends."""

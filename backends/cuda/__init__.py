"""dsv4.backends.cuda."""

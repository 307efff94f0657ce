"""dsv4.cli."""

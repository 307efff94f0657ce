"""dsv4.export."""

"""dsv4.portable."""

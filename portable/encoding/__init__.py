"""dsv4.portable.encoding."""

"""dsv4: a portable inference runtime for DeepSeek V4."""

"""Backends: implementations of `portable.ops.Ops` (plus weight and state storage), each found by name
through `portable.runtime`'s registry so an uninstalled one costs nothing but a clear error."""

"""A dense export's weight data is what `backends.catalog` declares for onnx (the memory estimate's source);
the quantized export's is the checkpoint's bytes (test_onnx_quantized)."""

import json

import pytest

import dsv4
from dsv4.backends.catalog import HOLDINGS
from dsv4.portable.weights import held_bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_export_data_bytes_match_the_declared_holding(tiny_dir, onnx_export, dtype):
    out = onnx_export(tiny_dir, 512, dtype)           # the context of test_onnx_export's exports (shared)
    data = json.loads((out / "manifest.json").read_text())["data"]["bytes"]
    want = held_bytes(dsv4.ModelConfig.from_file(tiny_dir), HOLDINGS["onnx"], dtype)
    assert want <= data <= 1.02 * want             # alignment padding only (64 B, 64 KiB for large tensors)

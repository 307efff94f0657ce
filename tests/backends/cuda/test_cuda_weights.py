"""The torch weight store holds exactly what `backends.catalog` declares (the memory estimate's source)."""

import pytest
import torch

import dsv4
from dsv4.backends.catalog import HOLDINGS
from dsv4.backends.cuda.weights import ExpertBank, TorchQuant
from dsv4.portable.weights import held_bytes


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.nbytes
    if isinstance(v, TorchQuant):
        return v.data.nbytes + v.scale.nbytes
    assert isinstance(v, ExpertBank)
    return _nbytes(v.w1) + _nbytes(v.w2) + _nbytes(v.w3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_held_bytes_match_the_loaded_store(tiny_any, dtype):
    m = dsv4.load(tiny_any, backend="cuda", dtype=dtype, context=64)
    held = sum(_nbytes(v) for v in m.runner.weights._cache.values())
    assert held == held_bytes(m.config, HOLDINGS["cuda"], dtype)

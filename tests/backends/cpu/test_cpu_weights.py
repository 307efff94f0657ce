"""The CPU backend's weight store: what `backends.catalog` declares it holds is what a loaded model holds,
and the weights stay at their stored size (codes as stored; float matrices as BF16 words)."""

import numpy as np
import pytest

pytest.importorskip("numba")

import dsv4  # noqa: E402
from dsv4.backends.catalog import HOLDINGS  # noqa: E402
from dsv4.backends.cpu import kernels  # noqa: E402
from dsv4.backends.cpu.weights import NO_SCALE, CpuLinear, ExpertBank  # noqa: E402
from dsv4.portable.checkpoint import Checkpoint  # noqa: E402
from dsv4.portable.weights import held_bytes  # noqa: E402


def _nbytes(v) -> int:
    if isinstance(v, np.ndarray):
        return v.nbytes
    if isinstance(v, CpuLinear):
        return v.codes.nbytes + (0 if v.scale is NO_SCALE else v.scale.nbytes)     # one shared placeholder
    assert isinstance(v, ExpertBank)
    return sum(_nbytes(w) for w in (v.w1, v.w2, v.w3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_held_bytes_match_the_loaded_store(tiny_any, dtype):
    m = dsv4.load(tiny_any, backend="cpu", dtype=dtype, context=64)
    cache = m.runner.weights._cache
    assert sum(_nbytes(v) for v in cache.values()) == held_bytes(m.config, HOLDINGS["cpu"], dtype)
    assert cache["embed.weight"].fmt == cache["head.weight"].fmt == kernels.BF16
    codes = sum(v.codes.nbytes if isinstance(v, CpuLinear) else sum(w.codes.nbytes for w in (v.w1, v.w2, v.w3))
                for v in cache.values() if isinstance(v, (CpuLinear, ExpertBank)))
    ckpt = Checkpoint(tiny_any)
    stored = sum(ckpt.spec(n).nbytes for n in ckpt.names() if ckpt.spec(n).dtype in ("F8_E4M3", "I8", "BF16")
                 and len(ckpt.spec(n).shape) == 2)
    assert codes == stored

"""Shared fixtures: the synthetic tiny checkpoints (official layout), built once per machine in the cache."""

import numpy as np
import pytest

from dsv4.portable.tiny import ensure_tiny


@pytest.fixture(scope="session")
def tiny_dir():
    return ensure_tiny("tiny")


@pytest.fixture(scope="session")
def tiny2_dir():
    return ensure_tiny("tiny2")


@pytest.fixture(scope="session", params=["tiny", "tiny2"])
def tiny_any(request):
    """Both tiny configs (spec §11.1 and a second one with other sizes)."""
    return ensure_tiny(request.param)


@pytest.fixture
def rand_ids():
    """Fresh random token ids in the tiny vocab (never zeros)."""
    def make(n, seed=0, vocab=1024):
        return np.random.default_rng(seed).integers(3, vocab, n)
    return make


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """onnx_export(checkpoint_dir, context, weights="quantized", mtp=True) → export directory, made once per
    session per (checkpoint, context, weights, mtp)."""
    from dsv4.export import export_onnx
    made = {}

    def get(ckpt_dir, context, weights="quantized", mtp=True):
        key = (str(ckpt_dir), context, weights, mtp)
        if key not in made:
            made[key] = export_onnx(ckpt_dir, tmp_path_factory.mktemp("onnx"), weights=weights, context=context,
                                    mtp=mtp)
        return made[key]
    return get

"""MLX backend fixtures: the tiny checkpoints (official layout) and float64 reference logits, built once
per session because the reference is the slow part."""

import numpy as np
import pytest

pytest.importorskip("mlx.core")

import dsv4  # noqa: E402
from dsv4.portable.config import preset  # noqa: E402
from dsv4.portable.tiny import ensure_tiny, write_checkpoint  # noqa: E402

CONTEXT = 512
N_POS = 300


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """name → checkpoint dir; the cached tiny checkpoints, or weights-only copies while the test
    tokenizer (needed by ensure_tiny) is unavailable."""
    dirs = {}

    def get(name):
        if name not in dirs:
            try:
                dirs[name] = ensure_tiny(name)
            except ImportError:
                dirs[name] = write_checkpoint(preset(name), tmp_path_factory.mktemp(name), tokenizer=None)
        return dirs[name]
    return get


@pytest.fixture(scope="session")
def session_ids():
    """Random prompt ids (never zeros or specials), 300 per config."""
    rng = np.random.default_rng(2604)
    return {name: rng.integers(3, preset(name).vocab_size, N_POS) for name in ("tiny", "tiny2")}


@pytest.fixture(scope="session")
def ref64(ckpt, session_ids):
    """name → float64 reference logits [300, V] for session_ids[name]."""
    out = {}

    def get(name):
        if name not in out:
            m = dsv4.load(ckpt(name), backend="reference", dtype="float64", context=CONTEXT)
            out[name] = m.forward(session_ids[name], full_precision=True)
        return out[name]
    return get


@pytest.fixture(scope="session")
def mlx32(ckpt):
    """name → the float32 MLX model (loaded once)."""
    models = {}

    def get(name):
        if name not in models:
            models[name] = dsv4.load(ckpt(name), backend="mlx", dtype="float32", context=CONTEXT)
        return models[name]
    return get


@pytest.fixture(scope="session")
def rel_err():
    """Per-position relative error ‖out−ref‖/‖ref‖ over the vocabulary axis."""
    def err(out, ref):
        return np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return err

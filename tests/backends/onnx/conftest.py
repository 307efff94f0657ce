"""ONNX exports of the tiny checkpoints, made once per session (context 512 keeps the state small)."""

import pytest

pytest.importorskip("onnxruntime")

from dsv4.export import export_onnx  # noqa: E402

CONTEXT = 512


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """onnx_export(checkpoint_dir, dtype="float32", mtp=True) → export directory (cached)."""
    made = {}

    def get(ckpt_dir, dtype="float32", mtp=True):
        key = (str(ckpt_dir), dtype, mtp)
        if key not in made:
            made[key] = export_onnx(ckpt_dir, tmp_path_factory.mktemp("onnx"), dtype=dtype, context=CONTEXT, mtp=mtp)
        return made[key]
    return get

"""ONNX exports of the tiny checkpoints, made once per session per (checkpoint, dtype, mtp, context)."""

import pytest

pytest.importorskip("onnxruntime")

from dsv4.export import export_onnx  # noqa: E402


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """onnx_export(checkpoint_dir, context, dtype="float32", mtp=True) → export directory (cached)."""
    made = {}

    def get(ckpt_dir, context, dtype="float32", mtp=True):
        key = (str(ckpt_dir), context, dtype, mtp)
        if key not in made:
            made[key] = export_onnx(ckpt_dir, tmp_path_factory.mktemp("onnx"), dtype=dtype, context=context, mtp=mtp)
        return made[key]
    return get

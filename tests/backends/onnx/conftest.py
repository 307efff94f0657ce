"""ONNX tests need onnxruntime (the `onnx` extra); the export fixture lives in tests/conftest.py."""

import pytest

pytest.importorskip("onnxruntime")

"""The backend registry: built-in backends register themselves, and declare what `make_runner` takes."""

import importlib
from pathlib import Path

import pytest

import dsv4
from dsv4.backends import catalog
from dsv4.portable import runtime
from dsv4.portable.checkpoint import Checkpoint
from dsv4.portable.reference import make_runner as reference_runner


@pytest.mark.parametrize("name", sorted(runtime._BUILTIN))
def test_builtin_backends_register_themselves(name):
    if not catalog.installed(name):
        pytest.skip(f"{name} is not installed")
    make_runner = runtime.get_backend(name)
    assert make_runner is importlib.import_module(runtime._BUILTIN[name]).make_runner
    assert (name in runtime._READS_DIRECTORY) == (name == "onnx")


def test_load_passes_what_the_backend_declares(tiny_dir, monkeypatch):
    got = {}

    def recording(kind):
        def make(cfg, source, **kw):
            got[kind] = source
            ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
            return reference_runner(cfg, ckpt, **kw)
        return make

    monkeypatch.setattr(runtime, "_FACTORIES", dict(runtime._FACTORIES))
    monkeypatch.setattr(runtime, "_READS_DIRECTORY", set(runtime._READS_DIRECTORY))
    dsv4.register_backend("ckpt-reader", recording("ckpt"))
    dsv4.register_backend("dir-reader", recording("dir"), reads_checkpoint=False)
    dsv4.load(tiny_dir, backend="ckpt-reader", context=32)
    dsv4.load(tiny_dir, backend="dir-reader", context=32)
    assert isinstance(got["ckpt"], Checkpoint) and got["dir"] == Path(tiny_dir)

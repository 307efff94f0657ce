"""Requantized formats within their documented bounds (qlinear.py), and `convert` round trips."""

import json

import numpy as np
import pytest

import dsv4
from dsv4.backends.mlx.convert import convert
from dsv4.portable.checkpoint import Checkpoint
from dsv4.portable.runtime import BackendError

N = 64


@pytest.mark.parametrize("bits,q_mode,median_bound,argmax_floor", [
    (8, "mxfp4", 1e-5, 1.0),          # lossless: FP4 → mxfp4, FP8 → mxfp8
    (8, "affine", 0.05, 0.8),
    (4, "affine", 0.6, 0.3),
    (4, "mxfp4", 0.6, 0.3),
])
def test_format_error_within_documented_bound(bits, q_mode, median_bound, argmax_floor, ckpt, session_ids,
                                              ref64, rel_err):
    m = dsv4.load(ckpt("tiny"), backend="mlx", context=N, bits=bits, q_mode=q_mode)
    out, ref = m.forward(session_ids["tiny"][:N]), ref64("tiny")[:N]
    err = rel_err(out, ref)
    assert np.median(err) <= median_bound
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= argmax_floor


def test_weights_stay_compact(ckpt, mlx32):
    """Native forms hold about the checkpoint's bytes (+1/32 for per-32 FP8 scales, + f32 head/gate)."""
    path = ckpt("tiny")
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    held = mlx32("tiny").runner.weights.nbytes()
    assert 0.9 * stored <= held <= 1.1 * stored
    small = dsv4.load(path, backend="mlx", context=N, bits=4, q_mode="mxfp4").runner.weights.nbytes()
    assert small < held


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    calls = []
    out = convert(ckpt("tiny"), tmp_path_factory.mktemp("conv") / "mlx", progress=lambda d, t: calls.append((d, t)))
    return out, calls


def test_convert_writes_ready_dir_and_reports_progress(converted, ckpt):
    out, calls = converted
    fmt = json.loads((out / "config.json").read_text())["dsv4_format"]
    assert (fmt["backend"], fmt["bits"], fmt["q_mode"]) == ("mlx", 8, "mxfp4")
    assert {m for m, _ in fmt["tensors"].values()} == {"mxfp4", "mxfp8"}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1] > 0
    assert (out / "tokenizer.json").exists() == (ckpt("tiny") / "tokenizer.json").exists()
    with pytest.raises(FileExistsError):
        convert(ckpt("tiny"), out)


def test_converted_dir_loads_without_conversion_and_matches(converted, mlx32, session_ids):
    m = dsv4.load(converted[0], backend="mlx", context=N)
    assert type(m.runner.weights).__name__ == "ConvertedWeights"
    ids = session_ids["tiny"][:40]
    np.testing.assert_array_equal(m.forward(ids), mlx32("tiny").forward(ids))
    with pytest.raises(BackendError, match="converted for backend 'mlx'"):
        dsv4.load(converted[0], backend="reference")


@pytest.mark.parametrize("source", ["official", "converted"])
def test_load_reports_progress_over_every_byte(source, ckpt, converted):
    """`dsv4.load(progress=)`: calls rise monotonically to the checkpoint's tensor bytes, one per read."""
    path = ckpt("tiny") if source == "official" else converted[0]
    calls = []
    dsv4.load(path, backend="mlx", context=N, progress=lambda d, t: calls.append((d, t)))
    total = Checkpoint(path).nbytes()
    done = [d for d, _ in calls]
    assert len(calls) > 10 and {t for _, t in calls} == {total}
    assert done == sorted(done) and done[0] < total and done[-1] == total


def test_affine_convert_equals_load_time_requantization(ckpt, tmp_path, session_ids):
    out = convert(ckpt("tiny2"), tmp_path / "a4", bits=4, q_mode="affine")
    ids = session_ids["tiny2"][:24]
    a = dsv4.load(out, backend="mlx", context=N).forward(ids)
    b = dsv4.load(ckpt("tiny2"), backend="mlx", context=N, bits=4, q_mode="affine").forward(ids)
    np.testing.assert_array_equal(a, b)

"""The public API surface: load, backends registry errors, numerics modes, checkpoint round trip."""

import importlib.util
import logging

import numpy as np
import pytest

import dsv4
from dsv4.portable.checkpoint import Checkpoint
from dsv4.portable.encoding.tokenizer import model_tokenizer
from dsv4.portable.install import install_command
from dsv4.portable.runtime import get_backend


def test_unknown_backend_lists_choices():
    with pytest.raises(dsv4.BackendError, match="unknown backend 'metal'; available: cpu, cuda, mlx, onnx, reference"):
        dsv4.load("tiny", backend="metal")


def test_missing_model_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        dsv4.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="preset 'flash' has no weights"):
        dsv4.load("flash")


def test_missing_optional_dependency_names_the_install_command(monkeypatch):
    """The hint is the command for this installation (`install_command`), never `pip install 'dsv4[…]'`
    (dsv4 is not on a package index)."""
    from dsv4.portable import runtime
    monkeypatch.setitem(runtime._BUILTIN, "fake", "dsv4.backends.does_not_exist")
    with pytest.raises(dsv4.BackendError) as err:
        get_backend("fake")
    assert str(err.value) == ("backend 'fake' is not installed (dsv4.backends.does_not_exist is missing); "
                              f"install it with: {install_command('fake')}")
    assert "'dsv4[" not in str(err.value)


def test_tiny_checkpoint_is_official_layout(tiny_any):
    cfg = dsv4.ModelConfig.from_file(tiny_any)
    ck = Checkpoint(tiny_any)
    ck.validate(cfg)
    dtypes = {ck.spec(n).dtype for n in ck.names()}
    assert {"F8_E4M3", "F8_E8M0", "BF16", "F32", "I64"} <= dtypes
    assert ("I8" in dtypes) == (cfg.expert_dtype == "fp4")
    assert (tiny_any / "tokenizer.json").exists() and (tiny_any / "model.safetensors.index.json").exists()


def test_reference_maps_lazily_and_reports_no_load(tiny_dir):
    """The reference reads a tensor when the graph first uses it: nothing is read at load."""
    calls = []
    dsv4.load(tiny_dir, progress=lambda d, t: calls.append((d, t)))
    assert calls == []


def test_float32_and_bf16_against_float64(tiny_dir, rand_ids):
    ids = rand_ids(200, seed=31)
    ref = dsv4.load(tiny_dir, dtype="float64", context=256).forward(ids, full_precision=True)
    f32 = dsv4.load(tiny_dir, dtype="float32", context=256).forward(ids)
    bf16 = dsv4.load(tiny_dir, dtype="bfloat16", context=256).forward(ids)
    rel = lambda x: np.linalg.norm(x - ref) / np.linalg.norm(ref)   # noqa: E731
    assert rel(f32) < 1e-5
    assert 1e-4 < rel(bf16) < 0.2                      # bf16 rounding is visible but bounded
    assert (bf16.argmax(-1) == ref.argmax(-1)).mean() > 0.8


def test_emulated_official_numerics_are_close_but_not_identical(tiny_dir, rand_ids):
    ids = rand_ids(150, seed=12)
    plain = dsv4.load(tiny_dir, dtype="float32", context=256).forward(ids)
    emu = dsv4.load(tiny_dir, dtype="float32", context=256, emulate=True).forward(ids)
    rel = np.linalg.norm(emu - plain) / np.linalg.norm(plain)
    assert 1e-4 < rel < 0.3
    assert (emu.argmax(-1) == plain.argmax(-1)).mean() > 0.7


def test_demo_uses_the_real_tokenizer():
    model = dsv4.load("demo", context=128)
    assert model.config.vocab_size == 129280
    ids = model.tokenizer.encode_messages([{"role": "user", "content": "<｜User｜>hi"}])
    assert ids.count(model.tokenizer.special_ids["user"]) == 1     # injected text stays plain text
    assert np.isfinite(model.forward(ids)).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("mlx", marks=pytest.mark.skipif(
    importlib.util.find_spec("mlx") is None, reason="mlx is not installed"))])
@pytest.mark.parametrize("bad", [1024, 5000, -1])
def test_ids_outside_the_vocabulary_never_reach_a_backend(tiny_dir, backend, bad):
    """MLX does not bounds-check gathers (such an id crashed the whole process): every Model entry point
    that feeds a runner refuses the id first, in one line naming it."""
    model = dsv4.load(tiny_dir, backend=backend, context=64)

    def reached(*args):
        pytest.fail("an id outside the vocabulary reached the backend")
    model.runner.step = model.runner.mtp_step = reached
    calls = [lambda: model.step(model.new_state(1), np.asarray([[5, bad, 7]])),
             lambda: model.forward(np.asarray([3, bad])),
             lambda: model.mtp_forward(np.asarray([3, 4]), np.asarray([4, bad])),
             lambda: model.generate([5, 6, bad], max_tokens=2),
             lambda: next(model.stream([bad], max_tokens=2))]
    for call in calls:
        with pytest.raises(ValueError, match=f"^token id {bad} is outside this model's vocabulary of 1024 ids"):
            call()


def test_a_vocabulary_padded_past_the_tokenizer_is_noted_once_at_load(tiny_dir, tmp_path, caplog):
    """Tiny models have 1,024 embedding rows and a 984-token tokenizer: the extra ids decode to U+FFFD."""
    with caplog.at_level(logging.WARNING):
        model = dsv4.load(tiny_dir, context=64)
        assert model.tokenizer is model.tokenizer
        model_tokenizer(tmp_path, 129280)             # the official tokenizer on a model of its own size
    notes = [r.getMessage() for r in caplog.records if "embedding padding" in r.getMessage()]
    assert notes == [f"{tiny_dir}: the model's vocabulary (1,024 ids) is larger than its tokenizer's (984); ids "
                     f"from 984 on are embedding padding and decode to U+FFFD if the model samples one"]
    assert model.tokenizer.decode([5, 1000]).endswith("\ufffd")

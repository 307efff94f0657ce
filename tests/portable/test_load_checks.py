"""What `dsv4.load` checks before it runs a model: the directory's layout (`portable.layout`), the context
against the model's limit, the tokenizer against the model's vocabulary and the weights' values (NaN/Inf),
and what a step checks as it runs (its logits); each refusal is one line."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, models

import dsv4
from dsv4.portable.checkpoint import CheckpointError
from dsv4.portable.encoding import official_tokenizer_path
from dsv4.portable.encoding.tokenizer import TokenizerError
from dsv4.portable.layout import LayoutError, backend_of
from dsv4.portable.runtime import NonFiniteError

from ..broken_checkpoints import linked_copy, poke, raw


@pytest.fixture
def ckpt_copy(tmp_path, tiny_dir):
    """A private copy of the tiny checkpoint (official layout) to add or remove files in."""
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def ids(n=30):
    return np.random.default_rng(8).integers(3, 1000, n)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------- layout
def test_an_unrelated_manifest_leaves_a_checkpoint_a_checkpoint(ckpt_copy, tiny_dir):
    (ckpt_copy / "manifest.json").write_text(json.dumps({"name": "some other tool", "files": 3}))
    assert backend_of(ckpt_copy) is None
    got = dsv4.load(ckpt_copy, context=64).forward(ids())
    np.testing.assert_allclose(got, dsv4.load(tiny_dir, context=64).forward(ids()), rtol=1e-6, atol=1e-6)


def test_an_export_is_recognised_by_its_manifest_format_and_graph(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": "dsv4-onnx", "version": 2}))
    with pytest.raises(LayoutError) as e:
        backend_of(d)
    assert one_line(e).endswith("manifest.json describes a dsv4 ONNX export but model.onnx is missing "
                                "(copy the whole export directory)")
    (d / "model.onnx").write_bytes(b"graph")
    assert backend_of(d) == "onnx"
    with pytest.raises(dsv4.BackendError, match="was exported for backend 'onnx'; load it with backend='onnx'"):
        dsv4.load(d)


def test_what_is_not_a_model_directory_is_named(tmp_path, ckpt_copy):
    with pytest.raises(LayoutError) as e:
        dsv4.load(tmp_path)
    assert one_line(e).startswith(f"{tmp_path} has no config.json; a model directory is a checkpoint")
    for f in ckpt_copy.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(LayoutError) as e:
        dsv4.load(ckpt_copy)
    assert one_line(e) == f"{ckpt_copy} has config.json but no *.safetensors weights"


def test_a_converted_directory_names_its_backend(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    (ckpt_copy / "config.json").write_text(json.dumps({**cfg, "dsv4_format": {"backend": "mlx"}}))
    assert backend_of(ckpt_copy) == "mlx"
    with pytest.raises(dsv4.BackendError, match="was converted for backend 'mlx'; load it with backend='mlx'"):
        dsv4.load(ckpt_copy)


def test_a_checkpoint_is_not_an_export(tiny_dir):
    pytest.importorskip("onnxruntime")
    from dsv4.export import ExportError
    with pytest.raises(ExportError, match="is not a dsv4 ONNX export: no manifest.json"):
        dsv4.load(tiny_dir, backend="onnx")


# -------------------------------------------------------------------------------------------- context
def test_a_context_beyond_the_model_is_refused_not_clamped(tiny_dir):
    limit = dsv4.ModelConfig.from_file(tiny_dir).max_position_embeddings
    with pytest.raises(dsv4.ContextError) as e:
        dsv4.load(tiny_dir, context=limit * 4)
    assert one_line(e) == (f"context {limit * 4} is outside this model's range of 1..{limit} tokens "
                           f"(max_position_embeddings in its config.json)")
    with pytest.raises(dsv4.ContextError, match=f"context 0 is outside this model's range of 1..{limit}"):
        dsv4.load(tiny_dir, context=0)
    assert dsv4.load(tiny_dir, context=limit).context == limit
    assert dsv4.load(tiny_dir).context == min(16384, limit)       # the default follows the model


# ------------------------------------------------------------------------------------------ tokenizer
def test_a_tokenizer_without_v4_control_tokens_fails_at_load(ckpt_copy):
    (ckpt_copy / "tokenizer.json").write_text(HFTokenizer(models.BPE()).to_str())
    with pytest.raises(TokenizerError) as e:
        dsv4.load(ckpt_copy, context=64)
    msg = one_line(e)
    assert msg.startswith(f"{ckpt_copy / 'tokenizer.json'}: tokenizer lacks 14 of V4's control tokens (")
    assert "<｜User｜>" in msg and "<｜Assistant｜>" in msg and "</think>" in msg


def test_a_tokenizer_larger_than_the_vocabulary_fails_at_load(ckpt_copy):
    shutil.copy(official_tokenizer_path(), ckpt_copy / "tokenizer.json")
    with pytest.raises(TokenizerError) as e:
        dsv4.load(ckpt_copy, context=64)
    assert one_line(e) == (f"{ckpt_copy / 'tokenizer.json'} has 129,280 tokens but the model's vocabulary "
                           f"(vocab_size in config.json) is 1,024: it belongs to another model")


def test_a_weights_only_checkpoint_loads_but_never_gets_a_tokenizer_too_large(ckpt_copy, tiny_dir):
    """Without tokenizer.json the official tokenizer is the fallback, refused where it exceeds vocab_size
    (it used to be handed out silently, and its ids crashed the MLX backend)."""
    (ckpt_copy / "tokenizer.json").unlink()
    model = dsv4.load(ckpt_copy, context=64)                     # logits need no tokenizer
    np.testing.assert_allclose(model.forward(ids()), dsv4.load(tiny_dir, context=64).forward(ids()),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(TokenizerError) as e:
        model.tokenizer
    assert one_line(e) == (f"{ckpt_copy} has no tokenizer.json, and the official V4 tokenizer has 129,280 "
                           f"tokens but the model's vocabulary (vocab_size in config.json) is 1,024; put the "
                           f"model's own tokenizer.json there")



# ---------------------------------------------------------------------------------- weight values
@pytest.fixture
def nan_norm(tmp_path, tiny_dir):
    """The tiny checkpoint with one NaN in the final norm (a symlinked copy: only that shard is private)."""
    d = linked_copy(tiny_dir, tmp_path / "nan-norm")
    norm = raw(d, "norm.weight")
    norm[3] = 0x7FC0                                            # a bf16 quiet NaN
    return poke(d, "norm.weight", norm)


@pytest.mark.parametrize("backend", ["reference", "mlx"])
def test_nonfinite_weights_fail_at_load_and_nan_logits_at_run_time(nan_norm, backend):
    """The load scan names the tensor; loaded anyway (validate=False), the first step names the logits."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    with pytest.raises(CheckpointError) as e:
        dsv4.load(nan_norm, backend=backend, context=64)
    assert str(e.value) == (f"checkpoint {nan_norm}: 1 problem:\n"
                            f"  non-finite: norm.weight: 1 of 256 values are NaN or Inf, the first at [3]")
    model = dsv4.load(nan_norm, backend=backend, context=64, validate=False)
    message = ("the model produced NaN or Inf logits: its weights or the numbers in its config.json are "
               f"broken; scan the weights with: dsv4 info --check --model {nan_norm}")
    with pytest.raises(NonFiniteError) as e:
        model.forward(ids())
    assert one_line(e) == message
    with pytest.raises(NonFiniteError, match="NaN or Inf logits"):
        model.generate(ids(8), max_tokens=4)

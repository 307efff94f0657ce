"""`--model` the way `dsv4.load` reads it: Hugging Face repo ids, one layout detection, one context rule
and the tokenizer check, each failure one `error:` line with the model exit code (3) or usage (2)."""

import json
import shutil

import pytest
from huggingface_hub import constants

import dsv4
from dsv4.portable.encoding import official_tokenizer_path

from ..hf_cache import fake_hf_cache
from .cli_helpers import AUTO_CPU, error_line, json_out


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in `tmp_path/hub`; add(repo, ckpt_dir) puts a checkpoint in it."""
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    return lambda repo, ckpt_dir: fake_hf_cache(root, ckpt_dir, repo)


@pytest.fixture
def ckpt_copy(tmp_path, tiny_dir):
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


def test_a_cached_repo_id_is_a_model(dsv4_cli, hf_cache, tiny_dir):
    snap = hf_cache("dsv4-test/tiny", tiny_dir)
    out = json_out(dsv4_cli("info", "--model", "dsv4-test/tiny", "--json"))
    assert out["model"] == str(snap) and out["format"] == "official"
    out = json_out(dsv4_cli("generate", "Hi", "--model", "dsv4-test/tiny", "--context", 128, "-n", 3, "--json"))
    assert out["usage"]["completion_tokens"] >= 1


def test_an_uncached_repo_id_offline_is_one_line(dsv4_cli, hf_cache):
    r = dsv4_cli("generate", "Hi", "--model", "deepseek-ai/DeepSeek-V4-Flash")
    assert r.exit_code == 3
    assert error_line(r).startswith("error: deepseek-ai/DeepSeek-V4-Flash is not a local directory and not in "
                                    "the Hugging Face cache (")


def test_a_missing_directory_names_every_kind_of_model(dsv4_cli, tmp_path):
    r = dsv4_cli("info", "--model", tmp_path / "nope")
    assert r.exit_code == 3
    assert error_line(r) == (f"error: model directory not found: {tmp_path / 'nope'} (pass a checkpoint "
                             f"directory, a Hugging Face repo id such as deepseek-ai/DeepSeek-V4-Flash, or "
                             f"demo for the built-in demo model)")


def test_a_directory_without_config_is_one_line(dsv4_cli, tmp_path):
    r = dsv4_cli("info", "--model", tmp_path)
    assert r.exit_code == 3
    assert error_line(r).startswith(f"error: {tmp_path} has no config.json; a model directory is a checkpoint")


def test_an_unrelated_manifest_does_not_make_an_export(dsv4_cli, ckpt_copy):
    (ckpt_copy / "manifest.json").write_text(json.dumps({"description": "my notes"}))
    assert json_out(dsv4_cli("info", "--model", ckpt_copy, "--json"))["format"] == "official"
    out = json_out(dsv4_cli("generate", "Hi", "--model", ckpt_copy, "--context", 128, "-n", 2, "--json"))
    assert out["backend"] == AUTO_CPU


def test_the_context_rule_is_the_api_rule(dsv4_cli, tiny_dir):
    limit = dsv4.ModelConfig.from_file(tiny_dir).max_position_embeddings
    with pytest.raises(dsv4.ContextError) as api:
        dsv4.load(tiny_dir, context=16384)
    r = dsv4_cli("generate", "Hi", "--model", tiny_dir, "--context", 16384)
    assert r.exit_code == 2
    assert error_line(r) == f"error: {api.value}"
    assert f"1..{limit} tokens" in str(api.value)


def test_a_tokenizer_that_does_not_fit_is_one_line(dsv4_cli, ckpt_copy):
    shutil.copy(official_tokenizer_path(), ckpt_copy / "tokenizer.json")
    r = dsv4_cli("generate", "Hi", "--model", ckpt_copy, "--context", 128)
    assert r.exit_code == 3
    assert error_line(r) == (f"error: {ckpt_copy / 'tokenizer.json'} has 129,280 tokens but the model's "
                             f"vocabulary (vocab_size in config.json) is 1,024: it belongs to another model")


def test_a_weights_only_checkpoint_cannot_chat_with_the_official_tokenizer(dsv4_cli, ckpt_copy):
    (ckpt_copy / "tokenizer.json").unlink()
    r = dsv4_cli("generate", "Hi", "--model", ckpt_copy, "--context", 128)
    assert r.exit_code == 3
    assert error_line(r).startswith(f"error: {ckpt_copy} has no tokenizer.json, and the official V4 tokenizer "
                                    f"has 129,280 tokens but the model's vocabulary")

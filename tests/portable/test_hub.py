"""Hugging Face repo ids as model names: the local HF cache first, HF_HUB_OFFLINE honoured, a download
otherwise, and one clear line when a repo is neither cached nor downloadable.  No test touches the
network: the cache is a fake one in the Hub's own layout, and the "online" Hub is a closed local port."""

import os
import subprocess
import sys

import numpy as np
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

import dsv4
from dsv4.portable import hub

from ..hf_cache import fake_hf_cache

REPO = "dsv4-test/tiny"
@pytest.fixture
def offline_cache(tmp_path, tiny_dir, monkeypatch):
    """This process sees `tmp_path/hub` as its HF cache (holding REPO) with HF_HUB_OFFLINE=1."""
    root = tmp_path / "hub"
    snap = fake_hf_cache(root, tiny_dir, REPO)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snap


@pytest.mark.parametrize("name,ok", [("deepseek-ai/DeepSeek-V4-Flash", True), ("org/model.v2", True),
                                     ("tiny", False), ("./org/name", False), ("/abs/dir", False),
                                     ("a/b/c", False), ("org/..", False), ("org--x/name", False)])
def test_repo_id_shape(name, ok):
    assert hub.is_repo_id(name) is ok


def test_a_cached_repo_loads_offline_like_its_directory(offline_cache, tiny_dir):
    ids = np.random.default_rng(4).integers(3, 1000, 40)
    model = dsv4.load(REPO, context=64)
    assert model.path == offline_cache
    direct = dsv4.load(tiny_dir, context=64).forward(ids)
    np.testing.assert_allclose(model.forward(ids), direct, rtol=1e-6, atol=1e-6)


def test_an_uncached_repo_offline_is_one_clear_line(offline_cache):
    with pytest.raises(hub.HubError) as e:
        dsv4.load("dsv4-test/absent")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("dsv4-test/absent is not a local directory and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in msg


def test_online_a_missing_repo_is_downloaded_with_the_model_files(tmp_path, tiny_dir, monkeypatch):
    """Not cached and online: one snapshot_download of config, safetensors and tokenizer files."""
    import huggingface_hub
    calls = []

    def fake_download(repo_id, **kw):
        calls.append((repo_id, kw))
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(tiny_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert dsv4.load(REPO, context=64).path == tiny_dir
    assert [c[1].get("local_files_only", False) for c in calls] == [True, False]
    patterns = calls[1][1]["allow_patterns"]
    assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"} <= set(patterns)


def _fresh_python(code: str, env: dict) -> subprocess.CompletedProcess:
    """`code` in a new interpreter, so huggingface_hub reads these environment variables at import (None:
    unset)."""
    merged = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **env}
    full = {k: v for k, v in merged.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_the_environment_variables_are_honoured(tmp_path, tiny_dir):
    snap = fake_hf_cache(tmp_path / "hub", tiny_dir, REPO)
    r = _fresh_python(f"import dsv4; print(dsv4.load({REPO!r}, context=64).path)",
                      {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(snap)
    home = tmp_path / "home"                               # HF_HOME/hub is the cache when HF_HUB_CACHE is unset
    fake_hf_cache(home / "hub", tiny_dir, REPO)
    r = _fresh_python(f"import dsv4; print(dsv4.load({REPO!r}, context=64).path)",
                      {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(home / "hub"))


def test_an_unreachable_hub_is_one_clear_line(tmp_path):
    r = _fresh_python("import dsv4\ntry:\n    dsv4.load('dsv4-test/absent')\nexcept FileNotFoundError as e:\n"
                      "    print(e)",
                      {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "0",
                       "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dsv4-test/absent is not a local directory or in the Hugging Face cache, and "
                               "downloading it failed: ")

"""Hugging Face repo ids as model names: `dsv4.load("deepseek-ai/DeepSeek-V4-Flash")`.

A name of the form `owner/name` that is not a local path is looked up through `huggingface_hub`, in its
own cache, so weights fetched earlier (by dsv4, `hf download` or any other tool) are found again:
1. the local cache, without touching the network;
2. unless `HF_HUB_OFFLINE=1`, a download of the files a model directory needs (`ALLOW_PATTERNS`: config,
   safetensors, tokenizer; an export's manifest and graphs), with huggingface_hub's progress bars on
   stderr; an interrupted download resumes.
The cache location is huggingface_hub's: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`.  Failures are one `HubError` line saying why.
"""

from __future__ import annotations

import re
from pathlib import Path

ALLOW_PATTERNS = ["config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors",
                  "tokenizer.json", "tokenizer_config.json", "manifest.json", "*.onnx", "*.onnx.data"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(FileNotFoundError):
    """A repo id that is neither in the local Hugging Face cache nor downloadable; the message says why."""


def is_repo_id(name: str) -> bool:
    """`name` has the shape of a Hugging Face repo id (`owner/name`)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def snapshot(repo_id: str) -> Path:
    """The local directory of `repo_id`'s latest snapshot: from the cache, else downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:           # not cached, or only partly (an interrupted download)
        pass
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{repo_id} is not a local directory and not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE=1 forbids downloading it")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated on the Hugging Face Hub: accept its terms on huggingface.co, "
                       f"then log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} is not a local directory, and the Hugging Face Hub has no such repository "
                       f"(or it is private: log in with `hf auth login`)") from None
    except OSError as e:                      # no connection, Hub errors, disk full…
        raise HubError(f"{repo_id} is not a local directory or in the Hugging Face cache, and downloading "
                       f"it failed: {_first_line(e)}") from None

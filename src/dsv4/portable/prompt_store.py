"""A prompt cache on disk: decoding states saved by token-id prefix, so a restarted process resumes a
prompt it has read before instead of reading it again.

It is the second tier under the in-memory `PrefixCache`: states go to disk when the memory cache stores
them (a prompt fully read, a conversation's end), and a prompt whose longest saved prefix is longer
than what memory holds is restored from disk and fed only its remaining tokens.

Files.  One safetensors file per saved prefix, `<fingerprint[:16]>-<tokens>-<hash of the ids>.safetensors`:
the state's buffers as `StateRunner.state_to_numpy` copies them (bf16 words as float32, FP8/FP4 codes as
bytes), the ids themselves (`@ids`, checked on load, so a hash collision can only miss) and, when known,
the next-token logits (`@logits`).  The header's metadata repeats the fingerprint, the token count and
the state's capacity.  The token count in the name is the index: a lookup lists the directory once and
tries each saved length of this model that fits the prompt, longest first, by computing that prefix's
hash.  Writes go to a hidden temp file in the directory and are renamed into place (`os.replace`), so a
reader never sees half a file; a temp file left by a crash is never read and is deleted once stale.
The directory is bounded: after each save the least recently used files (by mtime, which a hit touches;
atime is unreliable under relatime/noatime) are deleted until the total fits.  Saving runs on the thread
that stores the snapshot (the engine's): a host copy of the rows held and one file write, each
proportional to the tokens held, the price of a prompt that need not be read again after a restart.

Fingerprint (`model_fingerprint`).  A state is valid only for the numerics that wrote it, so the
fingerprint hashes: the checkpoint's identity (every file of the model directory — config, tokenizer,
weights — by name, size and its first and last 64 KiB — a sample, not a full hash: reading 160 GB at start-up is not
an option, and headers plus the ends of the tensor data differ between any two real checkpoints), the
backend, dtype, quantization-emulation flag and state format, and the state schema (buffer names, kinds
and shapes at one capacity, so a change of `portable.cache` invalidates old files).  The capacity and
the context are not part of it: a state is restored at the capacity its tokens need.  States therefore
move between runs of the same backend and dtype only; a state written by MLX is not loaded by the
reference even where both would read it, because its rounding is MLX's and a continuation from it would
not be the one the reference computes.

A file that does not parse, whose metadata or ids disagree with its name, or whose buffers do not fit
the model's state is ignored with one warning and deleted: a cache must never fail a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from . import cache

log = logging.getLogger("dsv4.prompt_store")

FORMAT = "dsv4-prompt-state/1"
SAMPLE = 64 * 1024                     # bytes hashed at each end of a model file
STALE_TEMP_S = 3600                    # a temp file this old belongs to a writer that died
IDS, LOGITS = "@ids", "@logits"        # tensor names beside the state's buffers (which start with L, mtp, start)
_NAME = re.compile(r"^([0-9a-f]{16})-(\d+)-([0-9a-f]{32})\.safetensors$")


class PromptCacheError(ValueError):
    """A prompt cache directory or size bound that cannot be used (one line for the CLI)."""


def checkpoint_identity(path: Path) -> str:
    """A hash of a model directory's files (name, size, first and last `SAMPLE` bytes; hidden files and
    subdirectories left out): cheap at any checkpoint size, different for different checkpoints."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE))
            if size > SAMPLE:
                fh.seek(max(size - SAMPLE, SAMPLE))
                h.update(fh.read(SAMPLE))
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """What a saved state must match to be restored into `model` (see the module docstring)."""
    if model.path is None:
        raise PromptCacheError("a prompt cache on disk needs a model loaded from a directory")
    runner = model.runner
    fmt = runner.state_format
    schema = [(b.name, b.kind, list(b.shape)) for b in cache.state_spec(model.config, 1, cache.MIN_CAPACITY, fmt)]
    numerics = {"format": FORMAT, "backend": model.backend, "dtype": model.dtype, "state_format": fmt,
                "emulate": bool(getattr(runner.ops, "emulate", False)), "schema": schema}
    h = hashlib.sha256(json.dumps(numerics, sort_keys=True).encode())
    h.update(checkpoint_identity(model.path).encode())
    return h.hexdigest()


def ids_digest(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:32]


def _remove(path: Path) -> None:
    """Delete a file of the cache; one that is gone already or cannot be deleted is left to the next try."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


@dataclass
class Saved:
    """One saved prefix as read back: its length, the state's buffers, the logits after it (or None) and
    the string metadata given to `save`."""
    tokens: int
    arrays: dict
    logits: np.ndarray | None = None
    info: dict = field(default_factory=dict)


class PromptStore:
    """Saved states of one model (`fingerprint`) in `directory`, at most `max_bytes` in all (the bound
    covers every file in the directory, other models' included: it is one disk budget)."""

    def __init__(self, directory, fingerprint: str, max_bytes: int):
        if max_bytes <= 0:
            raise PromptCacheError(f"the prompt cache's size bound must be > 0 bytes, got {max_bytes}")
        self.dir = Path(directory).expanduser()
        try:
            if self.dir.exists() and not self.dir.is_dir():
                raise NotADirectoryError(0, "it is not a directory")
            self.dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.dir, os.W_OK | os.X_OK):
                raise PermissionError(0, "it is not writable")
        except OSError as e:
            raise PromptCacheError(f"cannot use {self.dir} as a prompt cache directory: {e.strerror or e}") from None
        self.fingerprint, self.max_bytes = fingerprint, int(max_bytes)

    def path_for(self, ids) -> Path:
        """Where the state after `ids` is (or would be) saved."""
        return self.dir / f"{self.fingerprint[:16]}-{len(ids)}-{ids_digest(ids)}.safetensors"

    # ------------------------------------------------------------------ writing
    def save(self, ids, arrays: dict, logits=None, info: dict | None = None) -> bool:
        """Save the state after `ids` (buffers by name); False when it was not written (larger than the
        bound, or the disk refused: one warning).  Saving a prefix already on disk only marks it used."""
        ids = [int(t) for t in ids]
        path = self.path_for(ids)
        if path.exists():
            self._touch(path)
            return True
        tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        tensors[IDS] = np.asarray(ids, dtype=np.int64)
        if logits is not None:
            tensors[LOGITS] = np.ascontiguousarray(logits, dtype=np.float32)
        if sum(t.nbytes for t in tensors.values()) > self.max_bytes:
            return False
        meta = {**(info or {}), "format": FORMAT, "fingerprint": self.fingerprint, "tokens": str(len(ids))}
        tmp = self.dir / f".tmp-{os.getpid()}-{time.monotonic_ns()}.safetensors"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except (OSError, SafetensorError) as e:         # disk full, directory gone or read-only
            _remove(tmp)
            log.warning("prompt cache: could not save %d tokens in %s: %s", len(ids), self.dir,
                        getattr(e, "strerror", None) or e)
            return False
        self._evict()
        return True

    def _evict(self) -> None:
        """Delete least recently used files until the directory fits `max_bytes`; stale temp files too."""
        now, files = time.time(), []
        for p in self.dir.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:          # another process deleted it meanwhile
                continue
            if p.name.startswith(".tmp-"):
                if now - st.st_mtime > STALE_TEMP_S:
                    _remove(p)
            elif _NAME.match(p.name):
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            _remove(p)
            total -= size

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:                         # evicted meanwhile, or not ours to touch: still a hit
            pass

    # ------------------------------------------------------------------ reading
    def saved_lengths(self) -> list[int]:
        """Token counts of this model's saved prefixes, longest first."""
        own = self.fingerprint[:16]
        found = (_NAME.match(name) for name in os.listdir(self.dir))
        return sorted({int(m.group(2)) for m in found if m and m.group(1) == own}, reverse=True)

    def longest(self, ids, longer_than: int = 0) -> Saved | None:
        """The longest saved prefix of `ids` with more than `longer_than` tokens, or None."""
        ids = [int(t) for t in ids]
        for n in self.saved_lengths():
            if longer_than < n <= len(ids):
                path = self.path_for(ids[:n])
                if path.exists():
                    saved = self._read(path, ids[:n])
                    if saved is not None:
                        self._touch(path)
                        return saved
        return None

    def _read(self, path: Path, ids: list) -> Saved | None:
        try:
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:              # evicted by another process since the listing
            return None
        except (OSError, SafetensorError) as e:
            return self.discard(path, f"not a readable safetensors file ({e})")
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            return self.discard(path, "saved for another model or by another version of dsv4")
        saved_ids = arrays.pop(IDS, None)
        if saved_ids is None or saved_ids.tolist() != ids:
            return self.discard(path, "its token ids do not match its name")
        return Saved(len(ids), arrays, arrays.pop(LOGITS, None), meta)

    def discard(self, path: Path, why: str) -> None:
        """Warn once about a file the cache cannot use and delete it (it would only be ignored again)."""
        log.warning("prompt cache: ignoring %s: %s", path.name, why)
        _remove(path)
        return None


class StateStore:
    """A `PromptStore` bound to a loaded model: (state, next-token logits) in, the same out — what a
    `PrefixCache` snapshot holds, so a restored prefix that is a whole prompt needs no model step."""

    def __init__(self, model, directory, max_bytes: int):
        self.model = model
        self.files = PromptStore(directory, model_fingerprint(model), max_bytes)

    def save(self, ids, state, logits) -> bool:
        """Save `state`, the state after `ids` (copied, not kept), and the logits that follow it."""
        arrays = self.model.runner.state_to_numpy(state)
        return self.files.save(ids, arrays, logits, {"capacity": str(state.capacity)})

    def restore(self, ids, longer_than: int = 0):
        """(tokens, state, logits) for the longest saved prefix of `ids` longer than `longer_than`, the
        state new and at the capacity those tokens need; None when there is none."""
        ids = list(ids)
        while True:
            saved = self.files.longest(ids, longer_than)
            if saved is None:
                return None
            try:
                if saved.logits is None:
                    raise ValueError("no next-token logits")
                state = self.model.runner.state_from_numpy(saved.arrays, int(saved.info["capacity"]))
            except (KeyError, ValueError) as e:
                self.files.discard(self.files.path_for(ids[:saved.tokens]), f"not a state of this model ({e})")
                ids = ids[:saved.tokens - 1]           # shorter prefixes only: the loop ends
                continue
            state.resize(self.model.runner.ops, cache.capacity_for(saved.tokens, self.model.context))
            return saved.tokens, state, saved.logits

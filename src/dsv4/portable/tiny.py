"""Checkpoints in the exact official on-disk layout that need no download: synthetic ones for tests, and
the shipped demo model.

Why synthetic: real V4 weights (160 GB+) cannot be fetched here, yet the loader, the FP8/FP4 formats and
every graph path must be exercised.  `write_checkpoint` produces sharded safetensors named and typed like
the release (F8_E4M3 + E8M0 128×128 scales, I8-packed e2m1 + per-32 E8M0 scales, BF16, F32, I64
`tid2eid`), a `config.json` and a `tokenizer.json`.  Scales follow model spec §11.1 so that logits are
neither flat nor exploding (std of logits ≈ 1–4 on the tiny presets).  The same writer stores given float
tensors (`tensors=`), which is how tools/train_demo.py writes the trained demo.

The demo (`ensure_demo`) ships inside the package as `dsv4/data/demo.zip` (LZMA; the unused embedding and
head rows are zeros, so the archive is a few MB) and is unpacked once into the user cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from . import quant
from .checkpoint import save_sharded, schema
from .config import PRESETS, ModelConfig, preset

FORMAT_VERSION = 1          # bump when the generator changes, so cached checkpoints are rebuilt


def init_tensor(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Float values for one tensor, chosen by its role (also the starting point of the demo's training)."""
    fan_in = shape[-1] if len(shape) > 1 else 1
    if name == "embed.weight":
        return rng.standard_normal(shape)
    if name == "head.weight":
        return rng.standard_normal(shape) * 2.0 / np.sqrt(fan_in)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if "hc_" in name and name.endswith("_fn"):
        return 0.02 * rng.standard_normal(shape)
    if "hc_" in name and name.endswith("_base"):
        return 0.1 * rng.standard_normal(shape)
    if "hc_" in name and name.endswith("_scale"):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith("attn_sink"):
        return 0.5 * rng.standard_normal(shape)
    if name.endswith(".ape"):
        return 0.3 * rng.standard_normal(shape)
    if name.endswith("gate.bias"):
        return 0.1 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def synthetic_tensors(cfg: ModelConfig, seed: int = 0, progress=None, tensors: dict | None = None) -> dict:
    """name → (safetensors dtype, raw array) for every tensor of `schema(cfg)`, in the official formats.
    Values come from `tensors` (name → float array by logical shape, int64 for id tables) when given,
    else from the seeded `init_tensor`; `progress(done, total)`, if given, is called after each tensor (the
    demo build takes seconds, so the CLI shows a bar)."""
    rng = np.random.default_rng(seed)
    out = {}
    specs = {s.name: s for s in schema(cfg)}

    def value(name, shape):
        return tensors[name] if tensors is not None else init_tensor(name, shape, rng)

    for i, s in enumerate(specs.values()):
        if progress is not None:
            progress(i, len(specs))
        if s.name.endswith(".scale"):
            continue
        if s.dtype == "I64":                                   # tid2eid: distinct experts per token id
            rows = tensors[s.name] if tensors is not None else [
                rng.choice(cfg.n_routed_experts, cfg.num_experts_per_tok, replace=False) for _ in range(s.shape[0])]
            out[s.name] = ("I64", np.asarray(rows, dtype=np.int64))
            continue
        scale_spec = specs.get(s.name[:-7] + ".scale") if s.name.endswith(".weight") else None
        if scale_spec is not None:
            logical = (s.shape[0], s.shape[1] * 2) if s.dtype == "I8" else s.shape
            w = np.asarray(value(s.name, logical), dtype=np.float32)
            qw = quant.quantize_fp4(w) if s.dtype == "I8" else quant.quantize_fp8_block(w)
            scale = qw.scale
            if scale_spec.dtype == "F32":
                scale = quant.e8m0_to_f32(scale).astype(np.float32)
            out[s.name] = (s.dtype, qw.data)
            out[scale_spec.name] = (scale_spec.dtype, scale)
            continue
        w = np.asarray(value(s.name, s.shape), dtype=np.float32)
        out[s.name] = ("BF16", quant.f32_to_bf16(w)) if s.dtype == "BF16" else ("F32", w)
    return out


def write_checkpoint(cfg: ModelConfig, out_dir, seed: int = 0, shard_bytes: int = 4 << 20,
                     tokenizer: str | None = "test", progress=None, tensors: dict | None = None) -> Path:
    """Write config.json, sharded safetensors + index and a tokenizer.json ('test' = the small test
    tokenizer sized to the vocab; 'v4' = the official V4 tokenizer, which needs vocab_size ≥ 129280;
    None = weights only).  `tensors`: float values to store instead of the seeded ones (`synthetic_tensors`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    save_sharded(out, synthetic_tensors(cfg, seed, progress, tensors), shard_bytes)
    if tokenizer is None:
        return out
    from .encoding import official_tokenizer_path, write_test_tokenizer
    if tokenizer == "v4":
        shutil.copy(official_tokenizer_path(), out / "tokenizer.json")
    else:
        write_test_tokenizer(out / "tokenizer.json", cfg.vocab_size)
    return out


STALE_S = 600               # a build takes seconds: an unfinished one untouched this long is abandoned


class CacheError(RuntimeError):
    """The user cache cannot hold a synthetic checkpoint (DSV4_CACHE a file, read-only, full); the message
    names the directory."""


def cache_dir() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4"))


def ensure_tiny(name: str = "tiny", seed: int = 0, progress=None) -> Path:
    """The checkpoint of synthetic preset `name` in the user cache: the shipped demo unpacked (`demo`), or
    the random-weight checkpoint generated (`progress` as in `synthetic_tensors`, called only when built)."""
    if name == "demo":
        return ensure_demo()
    return _ensure_cached(name, f"{name}-s{seed}-v{FORMAT_VERSION}", lambda tmp: write_checkpoint(
        preset(name), tmp, seed, tokenizer="v4" if name == "demo-random" else "test", progress=progress))


DEMO_ARCHIVE = Path(__file__).resolve().parent.parent / "data" / "demo.zip"
DEMO_FILES = re.compile(r"(config\.json|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors)")


def ensure_demo(archive: Path = DEMO_ARCHIVE) -> Path:
    """The shipped demo model (trained by tools/train_demo.py) in the official layout in the user cache:
    the package holds it compressed (its unused embedding and head rows are zeros, which compress to
    nothing), unpacked once into a directory named by the archive's digest, plus the official tokenizer."""
    try:
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise CacheError(f"the demo model's weights are missing from this installation ({archive}: "
                         f"{e.strerror or e}); reinstall dsv4") from None
    return _ensure_cached("demo", f"demo-{digest}", lambda tmp: _unpack_demo(archive, tmp))


def _unpack_demo(archive: Path, out: Path) -> None:
    """Extract the checkpoint files (only the official layout's file names, nothing else) and add the
    official tokenizer."""
    from .encoding import official_tokenizer_path
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            if not DEMO_FILES.fullmatch(member):
                raise CacheError(f"{archive} holds an unexpected file {member!r}; reinstall dsv4")
            with z.open(member) as src, open(out / member, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    shutil.copy(official_tokenizer_path(), out / "tokenizer.json")


def pack_demo(checkpoint: Path, archive: Path = DEMO_ARCHIVE) -> Path:
    """Write `archive` from a trained checkpoint directory (its tokenizer.json is left out: the package
    has the official one)."""
    files = sorted(f.name for f in Path(checkpoint).iterdir() if DEMO_FILES.fullmatch(f.name))
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_LZMA) as z:
        for name in files:
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))   # fixed: the archive is reproducible
            info.compress_type = zipfile.ZIP_LZMA
            with open(Path(checkpoint) / name, "rb") as src, z.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return archive


def _ensure_cached(name: str, dirname: str, build) -> Path:
    """`cache_dir() / dirname`, made once by `build(tmp)` atomically: built in a `.{name}-{pid}-*` directory
    renamed into place, which is removed if the build fails or is interrupted."""
    root = cache_dir()
    target = root / dirname
    if (target / "model.safetensors.index.json").exists():
        remove_orphans(root, name)
        return target
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_orphans(root, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{os.getpid()}-", dir=root))
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:                                        # another process won the race
            pass
    except OSError as e:
        why = "it is not a directory" if root.exists() and not root.is_dir() else e.strerror or str(e)
        raise CacheError(f"cannot build the {name} model in the cache {root} ({why}); set DSV4_CACHE to a "
                         f"writable directory") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)             # gone already once renamed into place
    return target


def remove_orphans(root: Path, name: str) -> None:
    """Delete the unfinished builds of `name` that a killed process left in `root`: untouched for STALE_S
    seconds and their builder (the pid in the directory's name; builds of older versions have none) no
    longer running.  The age is what keeps a live build safe on another machine sharing the cache."""
    pid = re.compile(rf"\.{re.escape(name)}-(\d+)-")
    longer = [f".{p}-" for p in PRESETS if p != name and p.startswith(f"{name}-")]    # demo vs demo-random
    for d in root.glob(f".{name}-*"):
        if any(d.name.startswith(p) for p in longer):
            continue
        try:
            old = time.time() - d.stat().st_mtime > STALE_S
        except OSError:                         # removed meanwhile
            continue
        owner = pid.match(d.name)
        if d.is_dir() and old and not (owner and _running(int(owner.group(1)))):
            shutil.rmtree(d, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)                         # signal 0: only asks whether the process exists
    except PermissionError:                     # it does, and belongs to someone else
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True

"""Broken copies of a checkpoint for the tests: cheap to make, and never touching the original.

A copy starts as a directory of symlinks to the original's files; a file is made private (`own`) before
anything writes to it, so a test may break one shard of the cached tiny checkpoint without copying the
rest or harming the cache every other test reads.
"""

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from dsv4.portable.checkpoint import INDEX_NAME, Checkpoint, save_sharded


def linked_copy(src: Path, dst: Path) -> Path:
    """`dst` holding a symlink to each file of `src`."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        (dst / f.name).symlink_to(f.resolve())
    return dst


def own(path: Path) -> Path:
    """`path` as a private file: a symlink is replaced by a copy of what it points to."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        shutil.copyfile(target, path)
    return path


def edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    own(d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


def write(d: Path, name: str, data: bytes) -> Path:
    """Replace file `name` of the copy with `data`."""
    path = d / name
    if path.is_symlink():
        path.unlink()
    path.write_bytes(data)
    return d


def _location(d: Path, name: str) -> tuple[Path, int, int]:
    """(shard, absolute byte offset, byte count) of tensor `name`, from the index and the shard's header."""
    shard = d / json.loads((d / INDEX_NAME).read_text())["weight_map"][name]
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
    return shard, 8 + n + begin, end - begin


def raw(d: Path, name: str) -> np.ndarray:
    """Tensor `name` as stored (raw words / bytes), a private array."""
    return Checkpoint(d).read(name)


def poke(d: Path, name: str, values: np.ndarray) -> Path:
    """Overwrite the stored bytes of tensor `name` in place with `values` (raw, as `raw` returns them)."""
    shard, offset, nbytes = _location(d, name)
    data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    assert data.nbytes == nbytes, (name, data.nbytes, nbytes)
    with open(own(shard), "r+b") as f:
        f.seek(offset)
        f.write(data.tobytes())
    return d


def rewrite(d: Path, change) -> Path:
    """Write the copy's tensors again as new shards after `change(tensors)` edits the dict
    `{name: (dtype, raw array)}` (remove, add, retype)."""
    ck = Checkpoint(d)
    tensors = {n: (ck.spec(n).dtype, ck.read(n)) for n in ck.names()}
    change(tensors)
    for f in list(d.glob("*.safetensors")) + [d / INDEX_NAME]:
        f.unlink()
    save_sharded(d, tensors, 4 << 20)
    return d

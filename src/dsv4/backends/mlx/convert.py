"""`convert`: an official-layout V4 checkpoint → an MLX-ready directory.

The output holds every linear already in its MLX form (packed uint32 codes + scales [+ biases]), the
routed experts of each layer stacked into [E, out, in] banks for `gather_qmm`, the plain tensors in their
stored dtype, `config.json` (the source config plus a `dsv4_format` entry naming each quantized linear's
mode and bits), and the tokenizer files.  `dsv4.load(out_dir, backend="mlx")` then reads it with
`mx.load` and converts nothing.

Formats (see qlinear.py for the measured errors):
* q_mode="mxfp4", bits=8 (default): lossless — FP4 experts stay mxfp4, FP8 weights become mxfp8.
* q_mode="mxfp4", bits=4: FP8 weights requantized to mxfp4 (smaller, ≈10% weight error on them).
* q_mode="affine", bits=4|8: every FP8/FP4 weight requantized to affine with groups of 32.

Tensors are read with bounded reads (weights.TensorReader), one tensor or expert bank at a time, so peak
memory is one output shard (`shard_bytes`) plus one bank.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from dsv4.portable.checkpoint import EXPERT_PROJ, EXPERTS, INDEX_NAME, LINEAR, TABLE, Checkpoint, weight_schema
from dsv4.portable.config import ModelConfig

from . import qlinear
from .weights import FORMAT_KEY, FORMAT_VERSION, CheckpointWeights, converted_format

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


class _ShardWriter:
    """Accumulates arrays and writes `model-NNNNN.safetensors` shards of about `shard_bytes` each."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict = {}
        self.size = 0
        self.weight_map: dict = {}

    def add(self, name: str, arr: mx.array) -> None:
        self.pending[name] = arr
        self.size += arr.nbytes
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        mx.save_safetensors(str(self.out / fname), self.pending)
        self.weight_map.update({n: fname for n in self.pending})
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        index = {"metadata": {"format": "mlx"}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=1))


def _plan(cfg: ModelConfig) -> list[tuple[str, str, list[str]]]:
    """(output name, role, source tensors) in schema order; one entry per weight of the schema."""
    return [(e.name[:-len(".weight")] if e.role == LINEAR else e.name, e.role, [t.name for t in e.tensors])
            for e in weight_schema(cfg).values()]


def convert(src_dir, out_dir, bits: int = 8, q_mode: str = "mxfp4",
            progress: Callable[[int, int], None] | None = None, shard_bytes: int = 1 << 30) -> Path:
    """Write the MLX-ready form of the checkpoint at `src_dir` into `out_dir` (created; must be empty).

    `progress(done_bytes, total_bytes)` is called after each tensor group with source bytes processed."""
    src, out = Path(src_dir), Path(out_dir)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if q_mode not in qlinear.Q_MODES:
        raise ValueError(f"q_mode must be one of {', '.join(qlinear.Q_MODES)}, got {q_mode!r}")
    if converted_format(src) is not None:
        raise ValueError(f"{src} is already a converted directory; convert the original checkpoint")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    cfg = ModelConfig.from_file(src)
    ckpt = Checkpoint(src)
    ckpt.validate(cfg)
    out.mkdir(parents=True, exist_ok=True)

    plan = _plan(cfg)
    total = sum(ckpt.spec(n).nbytes for _, _, srcs in plan for n in srcs)
    done = 0
    layouts: dict = {}
    writer = _ShardWriter(out, shard_bytes)
    weights = CheckpointWeights(cfg, ckpt, bits, q_mode)  # bounded reads, one tensor or bank at a time
    for name, role, srcs in plan:
        if role == LINEAR:
            q = weights.linear(name)
            layouts[name] = [q.mode, q.bits]
            for suffix, arr in q.arrays().items():
                writer.add(f"{name}.{suffix}", arr)
        elif role == EXPERTS:
            for p in EXPERT_PROJ:
                q = weights.projection(name, p, cfg.n_routed_experts)
                layouts[name + p] = [q.mode, q.bits]
                for suffix, arr in q.arrays().items():
                    writer.add(f"{name}{p}.{suffix}", arr)
        elif role == TABLE:                               # int32 ids, range-checked
            writer.add(name, weights.table(name))
        else:                                             # plain and fp32 tensors: as stored
            writer.add(name, weights.reader.read_mx(name))
        done += sum(ckpt.spec(s).nbytes for s in srcs)
        if progress is not None:
            progress(done, total)
    writer.close()

    config = json.loads((src / "config.json").read_text())
    config[FORMAT_KEY] = {"backend": "mlx", "version": FORMAT_VERSION, "bits": bits, "q_mode": q_mode,
                          "tensors": layouts}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            shutil.copy(src / fname, out / fname)
    return out

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

from dsv4.portable.checkpoint import INDEX_NAME, Checkpoint
from dsv4.portable.config import ModelConfig

from . import qlinear
from .weights import EXPERT_PROJ, FORMAT_KEY, FORMAT_VERSION, CheckpointWeights, converted_format

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


def _plan(ckpt: Checkpoint) -> list[tuple[str, str, list[str]]]:
    """(output name, kind, source tensors) in checkpoint order; kind is plain | linear | experts."""
    names = ckpt.names()
    present = set(names)
    plan, banks = [], set()
    for name in names:
        if ".ffn.experts." in name:
            bank = name.split(".ffn.experts.")[0] + ".ffn.experts."
            if bank not in banks:
                banks.add(bank)
                plan.append((bank, "experts", [n for n in names if n.startswith(bank)]))
        elif name.endswith(".weight") and name[:-7] + ".scale" in present:
            plan.append((name[:-7], "linear", [name, name[:-7] + ".scale"]))
        elif not (name.endswith(".scale") and name[:-6] + ".weight" in present):
            plan.append((name, "plain", [name]))
    return plan


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

    plan = _plan(ckpt)
    total = sum(ckpt.spec(n).nbytes for _, _, srcs in plan for n in srcs)
    done = 0
    layouts: dict = {}
    writer = _ShardWriter(out, shard_bytes)
    weights = CheckpointWeights(ckpt, bits, q_mode)       # bounded reads, one tensor or bank at a time
    for name, kind, srcs in plan:
        if kind == "plain":
            writer.add(name, weights.reader.read_mx(name))
        elif kind == "linear":
            q = weights.linear(name)
            layouts[name] = [q.mode, q.bits]
            for suffix, arr in q.arrays().items():
                writer.add(f"{name}.{suffix}", arr)
        else:
            n = sum(1 for s in srcs if s.endswith(".w1.weight"))
            for p in EXPERT_PROJ:
                q = weights.bank(name, p, n)
                layouts[name + p] = [q.mode, q.bits]
                for suffix, arr in q.arrays().items():
                    writer.add(f"{name}{p}.{suffix}", arr)
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

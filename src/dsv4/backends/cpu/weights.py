"""Weights in the CPU backend's memory, at their stored size: FP8/FP4 codes and BF16 words as the
checkpoint holds them, read once with `Checkpoint.read` (no lasting memory map, so the process holds the
weights once), scales decoded to float32 at load (1/16384 of an FP8 weight's bytes, 1/16 of an FP4's).

Each layer's routed experts are stacked per projection into an `ExpertBank` ([E, rows·row-bytes] codes,
[E, …] scales) that the fused expert kernel addresses by expert id; indexing the bank gives per-expert
`CpuLinear` views (no copy) for the grouped prefill path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...portable import quant
from ...portable.checkpoint import EXPERT_PROJ
from ...portable.weights import WeightStore
from . import kernels

_FMT = {"fp8": kernels.FP8, "fp4": kernels.FP4, "float": kernels.BF16}
NO_SCALE = np.ones((1, 1), np.float32)


@dataclass(frozen=True, eq=False)
class CpuLinear:
    """A stored linear weight of logical shape (out, in): `codes` flat row-major (uint8 e4m3 or packed
    e2m1, uint16 bf16 words), `scale` float32 (FP8 [ceil(out/128), ceil(in/128)], FP4 [out, in/32],
    BF16 `NO_SCALE`), `fmt` a `kernels` format code."""

    fmt: int
    codes: np.ndarray
    scale: np.ndarray
    shape: tuple

    def rows(self, ids) -> np.ndarray:
        """Rows `ids` (any int array) decoded to float32 [*ids.shape, in]."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((ids.size, self.shape[1]), np.float32)
        kernels.decode_rows(self.fmt, self.codes, self.scale, self.shape[1], ids.reshape(-1), out)
        return out.reshape(*ids.shape, self.shape[1])

    def dense(self) -> np.ndarray:
        return self.rows(np.arange(self.shape[0]))


def _scales(qw: quant.QuantWeight) -> np.ndarray:
    """`qw`'s scales as float32 in the backend's own memory (not a view of the checkpoint's map)."""
    return NO_SCALE if qw.scale is None else np.array(quant.scale_f32(np.asarray(qw.scale)), np.float32)


def kernel_form(qw: quant.QuantWeight, data: np.ndarray | None = None):
    """`qw` as a `CpuLinear` over `data` (its stored values, already read into memory; default `qw.data`),
    or a float32 array for float weights the kernels do not read (float16/32/64)."""
    data = qw.data if data is None else data
    if qw.fmt == "float" and data.dtype != np.uint16:
        return np.asarray(data, np.float32)
    return CpuLinear(_FMT[qw.fmt], np.ascontiguousarray(data).reshape(-1), _scales(qw), qw.shape)


class ExpertBank:
    """The routed experts of one layer: per projection, codes [E, ·] and scales [E, …]."""

    def __init__(self, w1: CpuLinear, w2: CpuLinear, w3: CpuLinear, count: int):
        self.w1, self.w2, self.w3, self.count = w1, w2, w3, count
        self.fmt = w1.fmt

    def __len__(self):
        return self.count

    def __getitem__(self, e):
        if not 0 <= e < self.count:
            raise IndexError(e)
        return tuple(CpuLinear(w.fmt, w.codes[e], w.scale[e], w.shape) for w in (self.w1, self.w2, self.w3))


class CpuWeights(WeightStore):
    """The CPU backend's conversions for the schema-driven store (`portable.weights`); declared as
    `backends.catalog.HOLDINGS["cpu"]`."""

    def __init__(self, cfg, ckpt, dtype=np.float32):
        super().__init__(cfg, ckpt)
        self.dt = dtype

    def linear(self, prefix):
        return kernel_form(self.ckpt.quant_weight(prefix), self.ckpt.read(f"{prefix}.weight"))

    def plain(self, name):
        """A BF16 matrix (the embedding, head, router gate, compressor and indexer projections) stays BF16
        words: the graph only multiplies by it (the kernels) or looks rows up (`CpuOps.weight_rows`)."""
        spec = self.ckpt.spec(name)
        if spec.dtype == "BF16" and len(spec.shape) == 2:
            return kernel_form(quant.QuantWeight("float", self.ckpt.read(name), None, spec.shape))
        return self.ckpt.array(name, np.float32).astype(self.dt, copy=False)

    def table(self, name):
        return self.ids(name)

    def bank(self, entry):
        held = list(self.expert_ids(entry))
        projs = []
        for p in EXPERT_PROJ:
            qws = [self.ckpt.quant_weight(f"{entry.name}{e}.{p}") for e in held]
            codes = np.empty((len(held), qws[0].data.size), qws[0].data.dtype)
            for i, e in enumerate(held):
                self.ckpt.read(f"{entry.name}{e}.{p}.weight", out=codes[i])
            projs.append(CpuLinear(_FMT[qws[0].fmt], codes, np.stack([_scales(q) for q in qws]), qws[0].shape))
        return ExpertBank(*projs, len(held))

"""One weight store for every backend, driven by the checkpoint schema.

The graph reads its weights as `W[name]` (official tensor names) and `W.experts(prefix)` (the routed experts
of one layer).  `WeightStore` answers both from `checkpoint.weight_schema(cfg)`: each schema entry's role
(LINEAR, EXPERTS, PLAIN, FP32, TABLE) picks one conversion, and a backend supplies only those conversions
(how a quantized linear, a float tensor, an id table become its own objects, and how one layer's experts
are stacked).  Nothing re-derives from tensor names what a tensor is, and expert counts come from the schema.

In a parallel run the store reads through a `ShardReader` (one rank's view of the checkpoint) and so
holds that rank's parts only (`portable.sharding`); `expert_ids` says which routed experts its banks hold.

`Holding` is how a backend holds each role in memory; `held_bytes` turns it into the weight bytes of a
model from the schema alone, which is what memory estimates use (`dsv4 info`, the CLI's check before
loading) without loading — or importing — the backend.  The built-in backends' holdings are declared in
`dsv4.backends.catalog`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checkpoint import (EXPERT_PROJ, EXPERTS, FP32, LINEAR, NP_DTYPE, TABLE, Checkpoint, CheckpointError,
                         SchemaEntry, weight_schema)
from .config import ModelConfig
from .sharding import RankShard


class ShardReader(Checkpoint):
    """One rank's view of a `Checkpoint` in a parallel run: a split tensor reads as the rank's part (its
    spec has the part's shape; its bytes are copied with positional reads of that part alone), a
    replicated one as the whole memory-mapped tensor, and another rank's routed expert is refused.  A
    backend's weight store reads through it unchanged (`quant_weight`, `array`, `table` are the
    checkpoint's own, over these `spec`/`raw`), so FP8/FP4 parts stay quantized."""

    def __init__(self, ckpt: Checkpoint, shard: RankShard):
        vars(self).update(vars(ckpt))            # the same files, maps and entries
        self.shard = shard

    def _part(self, name: str):
        full = super().spec(name)
        if ".experts." in name and not self.shard.holds_expert(name):
            raise CheckpointError(f"tensor {name!r} belongs to another rank (rank {self.shard.rank} holds "
                                  f"experts {self.shard.experts.start}..{self.shard.experts.stop - 1})")
        return full, self.shard.part(name, full.shape)

    def spec(self, name: str):
        full, part = self._part(name)
        return full if part is None else self.shard.spec(full)

    def raw(self, name: str) -> np.ndarray:
        full, part = self._part(name)
        return super().raw(name) if part is None else self.read_part(name, part.axis, part.start, part.stop)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        full, part = self._part(name)
        if part is None:
            return super().read(name, out)
        data = self.read_part(name, part.axis, part.start, part.stop)
        if out is None:
            return data
        out[...] = data
        return out


def live_rows(row_max) -> np.ndarray | None:
    """The ids of the rows whose largest magnitude `row_max` [V] is not 0 (sorted), or None when every row
    is live: what `graph.HeadRows` keeps of a head."""
    live = np.asarray(row_max) > 0
    return None if live.all() else np.flatnonzero(live)


class WeightStore:
    """`W[name]` / `W.experts(prefix)` over a `Checkpoint`, each weight converted once on first use (or all
    at once by `load_all`).  Subclasses implement `linear`, `plain` and `table`; `fp32` defaults to `plain`
    and `bank` to a list of per-expert (w1, w2, w3) linears, which is what the default `Ops.moe` indexes."""

    def __init__(self, cfg: ModelConfig, ckpt):
        self.cfg, self.ckpt = cfg, ckpt
        self.schema = weight_schema(cfg)
        self.shard = ckpt.shard if isinstance(ckpt, ShardReader) else None     # a parallel run's rank
        self._cache: dict = {}

    def expert_ids(self, entry: SchemaEntry) -> range:
        """The routed experts of `entry` this store holds (all of them, or a parallel rank's part), in
        bank order: bank slot i is expert expert_ids[i]."""
        return range(entry.experts) if self.shard is None else self.shard.experts

    def _entry(self, name: str, bank: bool) -> SchemaEntry:
        entry = self.schema.get(name)
        if entry is None or (entry.role == EXPERTS) != bank:
            what = "an expert bank" if bank else "a tensor"
            raise KeyError(f"{name!r} is not {what} of this model's checkpoint schema")
        return entry

    def __getitem__(self, name: str):
        role = self._entry(name, bank=False).role
        if name not in self._cache:
            if role == LINEAR:
                val = self.linear(name[:-len(".weight")])
            elif role == TABLE:
                val = self.table(name)
            else:
                val = self.fp32(name) if role == FP32 else self.plain(name)
            self._cache[name] = val
        return self._cache[name]

    def experts(self, prefix: str):
        entry = self._entry(prefix, bank=True)
        if prefix not in self._cache:
            self._cache[prefix] = self.bank(entry)
        return self._cache[prefix]

    def load_all(self) -> None:
        """Convert every weight now (backends that copy their weights into their own memory at load)."""
        for name, entry in self.schema.items():
            if entry.role == EXPERTS:
                self.experts(name)
            else:
                self[name]

    def ids(self, name: str):
        """The id table `name` as range-checked int64 NumPy (what `table` converts)."""
        return self.ckpt.table(name, self.cfg.n_routed_experts)

    # ------------------------------------------------------------------ what a backend supplies
    def linear(self, prefix: str):
        """The quantized linear `prefix` (`prefix.weight` + `prefix.scale`) in the backend's form."""
        raise NotImplementedError

    def plain(self, name: str):
        """A float tensor used at activation precision."""
        raise NotImplementedError

    def fp32(self, name: str):
        """A float tensor the graph always reads in float32 (`Ops.hp`)."""
        return self.plain(name)

    def table(self, name: str):
        """An id table (start from `self.ids(name)`)."""
        raise NotImplementedError

    def bank(self, entry: SchemaEntry):
        """The `entry.experts` routed experts under `entry.name`."""
        return [tuple(self.linear(f"{entry.name}{e}.{p}") for p in EXPERT_PROJ) for e in self.expert_ids(entry)]


# ---------------------------------------------------------------------- memory
_COMPUTE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Holding:
    """How a backend holds each role, for estimates.  Float forms: "stored" (the checkpoint's bytes),
    "compute" (the run's dtype, at least `min_float` bytes), "float32", "widest" (the wider of stored and
    compute), "matrices" (2-D tensors as stored, the others in the compute dtype); linears: "stored"
    (copied as stored), "mapped" (read in place from the memory-mapped checkpoint: nothing beyond the
    map) or "dense" (dequantized to the compute dtype), their scales "stored", "float32" or "per32" (one
    byte per 32 inputs: MLX's mxfp8 form of an FP8 block scale)."""
    linear: str = "stored"
    scales: str = "stored"
    plain: str = "compute"
    fp32: str = "compute"
    table: int = 8              # bytes per id
    min_float: int = 2          # the smallest float the backend computes in (the reference: 4)
    mapped: bool = False        # the checkpoint is memory-mapped and read in place: its bytes are held too
    dense_cache: int = 0        # dense copies of quantized weights kept, up to this many bytes


def held_bytes(cfg: ModelConfig, holding: Holding, dtype: str) -> int:
    """Bytes of `cfg`'s weights held by a backend with `holding` running in `dtype`."""
    item = max(_COMPUTE[dtype], holding.min_float)
    total = dense = stored = 0
    for entry in weight_schema(cfg).values():
        tensors, times = instance(entry)
        stored += times * sum(t.nbytes for t in tensors)
        if entry.role in (LINEAR, EXPERTS):
            n = times * dense_elements(tensors)
            dense += n * item
            if holding.linear == "dense":
                total += n * item
            elif holding.linear == "stored":
                total += times * _linear_bytes(tensors, holding.scales)
        elif entry.role == TABLE:
            total += math.prod(tensors[0].shape) * holding.table
        else:
            total += _float_bytes(tensors[0], holding.fp32 if entry.role == FP32 else holding.plain, item)
    if holding.mapped:
        total += stored
    return total + min(holding.dense_cache, dense)


def instance(entry: SchemaEntry) -> tuple[tuple, int]:
    """(tensors of one instance, instances): one expert's and the bank's size for EXPERTS (every expert of a
    bank has the same tensors), else (all tensors, 1).  Lets byte counts skip the ~70k tensors of Flash."""
    if entry.role == EXPERTS:
        return entry.tensors[:2 * len(EXPERT_PROJ)], entry.experts
    return entry.tensors, 1


def dense_elements(tensors) -> int:
    """Weights of the quantized linears among `tensors` once dense (packed FP4 holds two per byte)."""
    return sum(math.prod(t.shape) * (2 if t.dtype == "I8" else 1) for t in tensors if t.name.endswith(".weight"))


def _linear_bytes(tensors, scales: str) -> int:
    total = 0
    for w, s in zip(tensors[::2], tensors[1::2]):
        total += w.nbytes
        if scales == "float32":
            total += math.prod(s.shape) * 4
        elif scales == "per32" and w.dtype == "F8_E4M3":
            total += math.prod(w.shape) // 32
        else:
            total += s.nbytes
    return total


def _float_bytes(spec, form: str, item: int) -> int:
    n, stored = math.prod(spec.shape), NP_DTYPE[spec.dtype].itemsize
    if form == "matrices":
        form = "stored" if len(spec.shape) == 2 else "compute"
    return n * {"stored": stored, "compute": item, "float32": 4, "widest": max(stored, item)}[form]

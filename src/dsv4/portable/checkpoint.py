"""Official V4 checkpoint layout (model spec §8): schema, a safetensors reader/writer, validation.

The schema (`weight_schema`, built once per config) lists every weight with its role — a quantized linear,
an expert bank, a plain or float32 tensor, an id table — which is what `portable.weights.WeightStore`
dispatches on for every backend, and what memory estimates count.

Why not the `safetensors` package: it has no numpy dtype for F8_E4M3 / F8_E8M0 and copies tensors into
memory, while a 160 GB checkpoint must be read lazily.  The format is tiny — an 8-byte little-endian
header length, a JSON header `{name: {dtype, shape, data_offsets}}`, then the raw bytes — so we parse
headers ourselves and hand out `np.memmap` views in the stored dtype:

    F8_E4M3, F8_E8M0, I8 (packed FP4), U8 → uint8    BF16 → uint16 (raw bf16 words)
    F16 → float16    F32 → float32    I16/I32/I64 → int16/32/64    U16/U32/U64 → uint16/32/64

(I8 is packed FP4 in the official layout; an I8 id table is read as int8 by `table`.)

Opening never fails on a broken shard: every problem (bad header, truncated data, index naming a
missing shard, ...) is recorded, reported by `validate` in one `CheckpointError` together with the
schema mismatches and the tensors whose stored values hold NaN or Inf (a NaN norm, an all-Inf head, an
E8M0 scale byte 0xFF would otherwise give silent garbage), and raised again when a broken tensor is
actually read.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .quant import (FP4_BLOCK, FP8_BLOCK, QuantWeight, bf16_nonfinite, bf16_to_f32, e4m3_nonfinite, e4m3_to_f32,
                    e8m0_nonfinite, e8m0_to_f32)

NP_DTYPE = {"F8_E4M3": np.dtype("u1"), "F8_E8M0": np.dtype("u1"), "I8": np.dtype("u1"), "U8": np.dtype("u1"),
            "BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
            "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
            "I64": np.dtype("<i8"), "U64": np.dtype("<u8")}
INDEX_NAME = "model.safetensors.index.json"
# Stored dtypes that can encode NaN or ±Inf, and the test that finds those values in raw data (packed FP4
# e2m1 and the integer dtypes have no such codes, so nothing in them needs scanning).
NONFINITE = {"BF16": bf16_nonfinite, "F8_E4M3": e4m3_nonfinite, "F8_E8M0": e8m0_nonfinite,
             "F16": lambda a: ~np.isfinite(a), "F32": lambda a: ~np.isfinite(a)}
SCAN_CHUNK = 16 << 20       # bytes read at a time when scanning values


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names every offending tensor or file."""

    @classmethod
    def listing(cls, path, problems: list[str]) -> "CheckpointError":
        """One error for all of `problems`: a headline with their count, then one problem per line (the
        CLI keeps the headline and the first few on its one line)."""
        n = len(problems)
        return cls(f"checkpoint {path}: {n} problem{'s' * (n != 1)}:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str    # safetensors dtype string
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NP_DTYPE[self.dtype].itemsize

    def __str__(self):
        return f"{self.dtype} {list(self.shape)}"


# ---------------------------------------------------------------------- schema
# What each weight is to the graph (its role), so a weight store dispatches on the schema, never on names:
LINEAR = "linear"     # a quantized linear: `prefix.weight` (F8_E4M3 or packed FP4 I8) + `prefix.scale`
EXPERTS = "experts"   # the routed experts of one layer: E × (w1, w2, w3) quantized linears
PLAIN = "plain"       # a float tensor used at activation precision (norms, embeddings, BF16 compressor weights)
FP32 = "fp32"         # a float tensor the graph always reads in float32 (`Ops.hp`): mHC, sinks, `ape`,
                      # the router gate and bias, the output head
TABLE = "table"       # an integer table (hash routing `tid2eid`): any integer dtype, ids range-checked
INT_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")
EXPERT_PROJ = ("w1", "w2", "w3")


@dataclass(frozen=True)
class SchemaEntry:
    """One weight as the graph asks for it: `W[name]`, or `W.experts(name)` for an EXPERTS bank (whose name
    is the prefix "layers.L.ffn.experts."); `tensors` are what the official checkpoint stores for it."""
    name: str
    role: str
    tensors: tuple
    experts: int = 0          # EXPERTS: the bank's size

    def linears(self) -> list[str]:
        """Prefixes of the quantized linears (`prefix.weight` + `prefix.scale`) this entry is made of."""
        if self.role == LINEAR:
            return [self.name[:-len(".weight")]]
        if self.role == EXPERTS:
            return [f"{self.name}{e}.{p}" for e in range(self.experts) for p in EXPERT_PROJ]
        return []


_SCHEMAS: dict = {}     # repr(cfg) → (entries, tensors): Flash has ~70k tensors, so built once per config


def weight_schema(cfg: ModelConfig) -> dict[str, SchemaEntry]:
    """Every weight of the official checkpoint for `cfg` by graph name, in layer order (model spec §8.3).
    Built once per config; the result is shared, do not modify it."""
    return _schema(cfg)[0]


def schema(cfg: ModelConfig) -> tuple[TensorSpec, ...]:
    """Every tensor of the official checkpoint for `cfg`, in layer order (model spec §8.3)."""
    return _schema(cfg)[1]


def _schema(cfg: ModelConfig) -> tuple[dict, tuple]:
    key = repr(cfg)
    if key not in _SCHEMAS:
        entries = _build_schema(cfg)
        _SCHEMAS[key] = entries, tuple(t for e in entries.values() for t in e.tensors)
    return _SCHEMAS[key]


def _build_schema(cfg: ModelConfig) -> dict[str, SchemaEntry]:
    out: dict[str, SchemaEntry] = {}
    D, V, hc = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult

    def t(name, dtype, *shape, role=None):
        role = role or (FP32 if dtype == "F32" else PLAIN)
        out[name] = SchemaEntry(name, role, (TensorSpec(name, dtype, tuple(shape)),))

    def fp8_specs(name, o, i, scale_dtype="F8_E8M0"):
        return (TensorSpec(f"{name}.weight", "F8_E4M3", (o, i)),
                TensorSpec(f"{name}.scale", scale_dtype, (-(-o // FP8_BLOCK), -(-i // FP8_BLOCK))))

    def fp8(name, o, i):
        out[f"{name}.weight"] = SchemaEntry(f"{name}.weight", LINEAR, fp8_specs(name, o, i))

    def expert_specs(name, o, i):
        if cfg.expert_dtype == "fp4":
            return (TensorSpec(f"{name}.weight", "I8", (o, i // 2)),
                    TensorSpec(f"{name}.scale", "F8_E8M0", (o, i // FP4_BLOCK)))
        return fp8_specs(name, o, i, "F32")     # -Base: FP8 block experts with float32 scales

    def hc_head(p):
        t(f"{p}hc_head_fn", "F32", hc, hc * D)
        t(f"{p}hc_head_base", "F32", hc)
        t(f"{p}hc_head_scale", "F32", 1)

    def compressor(p, layer, c):
        width = cfg.overlap(layer) * c           # CSA pools overlapping blocks: two halves per row
        t(f"{p}wkv.weight", "BF16", width, D)
        t(f"{p}wgate.weight", "BF16", width, D)
        t(f"{p}ape", "F32", cfg.ratio(layer), width)
        t(f"{p}norm.weight", "BF16", c)

    def block(p, layer, hashed):
        hd, inter, E = cfg.head_dim, cfg.moe_intermediate_size, cfg.n_routed_experts
        t(f"{p}attn_norm.weight", "BF16", D)
        t(f"{p}ffn_norm.weight", "BF16", D)
        for part in ("attn", "ffn"):
            t(f"{p}hc_{part}_fn", "F32", cfg.hc_mix, hc * D)
            t(f"{p}hc_{part}_base", "F32", cfg.hc_mix)
            t(f"{p}hc_{part}_scale", "F32", 3)
        a = f"{p}attn."
        fp8(f"{a}wq_a", cfg.q_lora_rank, D)
        t(f"{a}q_norm.weight", "BF16", cfg.q_lora_rank)
        fp8(f"{a}wq_b", cfg.num_attention_heads * hd, cfg.q_lora_rank)
        fp8(f"{a}wkv", hd, D)
        t(f"{a}kv_norm.weight", "BF16", hd)
        fp8(f"{a}wo_a", cfg.o_groups * cfg.o_lora_rank, cfg.heads_per_group * hd)
        fp8(f"{a}wo_b", D, cfg.o_groups * cfg.o_lora_rank)
        t(f"{a}attn_sink", "F32", cfg.num_attention_heads)
        if cfg.ratio(layer):
            compressor(f"{a}compressor.", layer, hd)
        if cfg.is_csa(layer):
            ih = cfg.index_n_heads
            fp8(f"{a}indexer.wq_b", ih * cfg.index_head_dim, cfg.q_lora_rank)
            t(f"{a}indexer.weights_proj.weight", "BF16", ih, D)
            compressor(f"{a}indexer.compressor.", layer, cfg.index_head_dim)
        f = f"{p}ffn."
        t(f"{f}gate.weight", "BF16", E, D, role=FP32)
        if hashed:
            t(f"{f}gate.tid2eid", "I64", V, cfg.num_experts_per_tok, role=TABLE)
        else:
            t(f"{f}gate.bias", "F32", E)
        shapes = {"w1": (inter, D), "w2": (D, inter), "w3": (inter, D)}
        bank = tuple(s for e in range(E) for w in EXPERT_PROJ for s in expert_specs(f"{f}experts.{e}.{w}", *shapes[w]))
        out[f"{f}experts."] = SchemaEntry(f"{f}experts.", EXPERTS, bank, E)
        fp8(f"{f}shared_experts.w1", inter, D)
        fp8(f"{f}shared_experts.w2", D, inter)
        fp8(f"{f}shared_experts.w3", inter, D)

    t("embed.weight", "BF16", V, D)
    t("head.weight", "BF16", V, D, role=FP32)
    t("norm.weight", "BF16", D)
    hc_head("")
    for L in range(cfg.num_hidden_layers):
        block(f"layers.{L}.", L, cfg.hash_routed(L))
    if cfg.num_nextn_predict_layers:
        p = "mtp.0."
        block(p, cfg.num_hidden_layers, False)   # MTP is never hash routed
        fp8(f"{p}e_proj", D, D)
        fp8(f"{p}h_proj", D, D)
        for n in ("enorm", "hnorm", "norm"):
            t(f"{p}{n}.weight", "BF16", D)
        hc_head(p)
    return out


# ---------------------------------------------------------------------- reader
@dataclass
class _Entry:
    spec: TensorSpec | None   # None when the header entry itself is unusable
    file: str
    begin: int = 0            # absolute byte offset in the file
    problem: str | None = None


class Checkpoint:
    """Lazy view of a safetensors checkpoint: a directory (index + shards, or *.safetensors) or one file."""

    def __init__(self, path):
        self.path = Path(path)
        self.problems: list[str] = []          # file-level problems
        self._entries: dict[str, _Entry] = {}
        self._maps: dict[str, np.memmap] = {}
        self._bad_files: set[str] = set()
        self._progress, self._read_bytes, self._total_bytes = None, 0, 0
        if self.path.is_file():
            self._files = {self.path.name: self.path}
            expected = None
        elif self.path.is_dir():
            expected, self._files = self._read_index()
        else:
            raise CheckpointError(f"no checkpoint at {self.path}")
        for fname, fpath in self._files.items():
            self._read_header(fname, fpath)
        if expected is not None:
            self._check_index(expected)

    def _read_index(self):
        idx = self.path / INDEX_NAME
        if not idx.exists():
            found = sorted(self.path.glob("*.safetensors"))
            files = {p.name: p for p in found if p.is_file()}
            for p in found:
                if not p.is_file():
                    self.problems.append(f"{p.name} is not a file")
            if not files:
                raise CheckpointError(f"{self.path}: neither {INDEX_NAME} nor any *.safetensors file"
                                      + (f" ({found[0].name} is not a file)" if found else ""))
            return None, files
        try:
            weight_map = json.loads(idx.read_bytes())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("weight_map is not an object of tensor name → file name")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            raise CheckpointError(f"{idx}: not a valid safetensors index ({type(e).__name__}: {why})") from None
        files = {}
        for fname in sorted(set(weight_map.values())):
            if (self.path / fname).is_file():
                files[fname] = self.path / fname
            else:
                names = sorted(n for n, f in weight_map.items() if f == fname)
                gone = "is not a file" if (self.path / fname).exists() else "does not exist"
                self.problems.append(f"{INDEX_NAME} names shard {fname!r}, which {gone} "
                                     f"({len(names)} tensors, e.g. {names[0]})")
                for n in names:
                    self._entries[n] = _Entry(None, fname, problem=f"its shard {fname!r} {gone}")
        return weight_map, files

    def _read_header(self, fname: str, fpath: Path):
        try:
            size = fpath.stat().st_size
            with open(fpath, "rb") as f:
                if size < 8:
                    raise ValueError(f"only {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size} (truncated or not safetensors)")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"header is not valid JSON ({e})") from None
                except RecursionError:
                    raise ValueError("header JSON is nested too deeply") from None
            if not isinstance(header, dict):
                raise ValueError("header JSON is not an object")
        except (OSError, ValueError) as e:
            why = f"cannot be read ({e.strerror})" if isinstance(e, OSError) else f"bad header: {e}"
            self.problems.append(f"{fname}: {why}")
            self._bad_files.add(fname)
            return
        data_start, data_len, need = 8 + n, size - 8 - n, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in self._entries:
                self.problems.append(f"tensor {name} appears in both {self._entries[name].file} and {fname}")
                continue
            try:
                spec = TensorSpec(name, info["dtype"], tuple(int(s) for s in info["shape"]))
                b, e = (int(o) for o in info["data_offsets"])
                if not isinstance(spec.dtype, str) or min(spec.shape, default=0) < 0:
                    raise ValueError("a dtype name and a shape of sizes ≥ 0")
            except (KeyError, TypeError, ValueError):
                self._entries[name] = _Entry(None, fname, problem=f"malformed header entry {reprlib.repr(info)} "
                                                                  f"in {fname}")
                continue
            entry = _Entry(spec, fname, data_start + b)
            if spec.dtype not in NP_DTYPE:
                entry.problem = f"unsupported dtype {spec.dtype} in {fname}"
            elif e - b != spec.nbytes or b < 0:
                entry.problem = f"data_offsets [{b}, {e}] in {fname} do not hold {spec} ({spec.nbytes} bytes)"
            elif e > data_len:
                entry.problem = f"data_offsets [{b}, {e}] lie beyond the end of {fname} (truncated)"
            need = max(need, e)
            self._entries[name] = entry
        if need > data_len:
            self.problems.append(f"{fname}: truncated: its header needs {need} data bytes, the file holds {data_len}")

    def _check_index(self, weight_map: dict):
        for name, entry in self._entries.items():
            if entry.spec is not None and weight_map.get(name) != entry.file:
                where = f"maps it to {weight_map[name]!r}" if name in weight_map else "does not list it"
                self.problems.append(f"tensor {name} is in {entry.file} but {INDEX_NAME} {where}")
        for name, fname in weight_map.items():
            if name not in self._entries:
                why = (f"the header of {fname} is unreadable" if fname in self._bad_files
                       else f"listed in {INDEX_NAME} but absent from {fname}")
                self._entries[name] = _Entry(None, fname, problem=why)

    # ------------------------------------------------------------------ access
    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.path}")
        if entry.problem:
            raise CheckpointError(f"tensor {name!r} cannot be read: {entry.problem}")
        return entry

    def spec(self, name: str) -> TensorSpec:
        return self._entry(name).spec

    def specs(self) -> list[TensorSpec]:
        """The specs of every tensor whose header entry is usable (what the checkpoint visibly holds)."""
        return [e.spec for _, e in sorted(self._entries.items()) if e.spec is not None and not e.problem]

    def nbytes(self) -> int:
        """Bytes of every readable tensor (what a backend that copies the whole checkpoint reads)."""
        return sum(e.spec.nbytes for e in self._entries.values() if e.spec and e.spec.dtype in NP_DTYPE)

    def watch(self, progress) -> None:
        """Call `progress(bytes_read, bytes_total)` each time a tensor is read or mapped for use from now
        on (None stops): backends that copy their weights into their own memory at load report the load
        through it, and a backend reading another layout (a converted directory) through `report`."""
        self._progress, self._read_bytes = progress, 0
        self._total_bytes = self.nbytes()

    def report(self, nbytes: int) -> None:
        if self._progress is not None:
            self._read_bytes = min(self._read_bytes + nbytes, self._total_bytes)
            self._progress(self._read_bytes, self._total_bytes)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy np.memmap view in the stored dtype (see the module docstring for the mapping)."""
        entry = self._entry(name)
        spec = entry.spec
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(self._files[entry.file], dtype=np.uint8, mode="r")
        buf = self._maps[entry.file][entry.begin:entry.begin + spec.nbytes]
        self.report(spec.nbytes)
        return buf.view(NP_DTYPE[spec.dtype]).reshape(spec.shape)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name` in its stored dtype (as `raw`), copied with bounded positional reads into `out`
        (C-contiguous, right size) or a fresh array.  Unlike `raw`'s map, nothing stays resident in the
        process after the copy: backends that convert weights into their own memory use this so the load's
        peak is the weights once, not the checkpoint pages plus the copy."""
        entry = self._entry(name)
        spec = entry.spec
        if out is None:
            out = np.empty(spec.shape, NP_DTYPE[spec.dtype])
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if buf.nbytes != spec.nbytes:
            raise ValueError(f"{name}: buffer of {buf.nbytes} bytes for a {spec.nbytes}-byte tensor")
        fd = os.open(self._files[entry.file], os.O_RDONLY)
        try:
            self._fill(fd, name, entry, buf, 0)
        finally:
            os.close(fd)
        self.report(spec.nbytes)
        return out

    def read_part(self, name: str, axis: int, start: int, stop: int) -> np.ndarray:
        """Rows (axis 0) or columns (axis 1) start..stop of tensor `name`, copied with positional reads of
        exactly those bytes (a parallel run's rank reads only its part: `portable.sharding`)."""
        entry = self._entry(name)
        spec = entry.spec
        dt = NP_DTYPE[spec.dtype]
        shape = list(spec.shape)
        inner = math.prod(shape[axis + 1:]) * dt.itemsize          # bytes of one index along `axis`
        shape[axis] = stop - start
        out = np.empty(shape, dt)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        outer = math.prod(spec.shape[:axis])                         # 1 for rows; the row count for columns
        width, stride = (stop - start) * inner, spec.shape[axis] * inner
        fd = os.open(self._files[entry.file], os.O_RDONLY)
        try:
            for r in range(outer):
                self._fill(fd, name, entry, buf[r * width:(r + 1) * width], r * stride + start * inner)
        finally:
            os.close(fd)
        self.report(out.nbytes)
        return out

    @staticmethod
    def _fill(fd: int, name: str, entry: _Entry, buf: memoryview, start: int) -> None:
        """Fill `buf` with the bytes of tensor `name` from byte `start` on, with bounded positional reads."""
        done = 0
        while done < buf.nbytes:
            n = os.preadv(fd, [buf[done:]], entry.begin + start + done)
            if n <= 0:
                raise CheckpointError(f"tensor {name!r}: {entry.file} ended after {start + done} of "
                                      f"{entry.spec.nbytes} bytes")
            done += n

    def nonfinite(self, name: str, chunk_bytes: int = SCAN_CHUNK) -> str | None:
        """What is non-finite among the stored values of tensor `name` ("3 of 256 values are NaN or Inf, the
        first at [0, 5]"), or None when every value is finite or its format has no such codes (`NONFINITE`).
        The tensor is read `chunk_bytes` at a time with bounded reads (as `read`), so a scan holds one chunk
        whatever the tensor's size and leaves nothing resident in the process."""
        entry = self._entry(name)
        spec = entry.spec
        test, total = NONFINITE.get(spec.dtype), math.prod(spec.shape)
        if test is None or total == 0:
            return None
        dtype = NP_DTYPE[spec.dtype]
        buf = np.empty(min(total, max(1, chunk_bytes // dtype.itemsize)), dtype)
        count, first = 0, None
        fd = os.open(self._files[entry.file], os.O_RDONLY)
        try:
            for start in range(0, total, len(buf)):
                part = buf[:min(len(buf), total - start)]
                self._fill(fd, name, entry, memoryview(part.view(np.uint8)), start * dtype.itemsize)
                bad = test(part)
                n = int(np.count_nonzero(bad))
                if n and first is None:
                    first = start + int(np.argmax(bad))
                count += n
        finally:
            os.close(fd)
        if not count:
            return None
        at = [int(i) for i in np.unravel_index(first, spec.shape)]
        return f"{count} of {total} values are NaN or Inf, the first at {at}"

    def array(self, name: str, dtype=np.float32) -> np.ndarray:
        """Decoded values of a plain tensor (BF16/F8 decoded, ints cast); packed FP4 needs `quant_weight`."""
        spec, raw = self.spec(name), self.raw(name)
        if spec.dtype == "I8":
            raise CheckpointError(f"tensor {name!r} is packed FP4 (I8); read it with quant_weight()")
        decode = {"BF16": bf16_to_f32, "F8_E4M3": e4m3_to_f32, "F8_E8M0": e8m0_to_f32}.get(spec.dtype)
        return (decode(raw) if decode else raw).astype(dtype)

    def table(self, name: str, limit: int) -> np.ndarray:
        """An integer id table (hash routing `tid2eid`) as int64, whatever integer dtype stores it (other tools
        save int32); every id must lie in 0..limit-1 (limit = n_routed_experts)."""
        spec = self.spec(name)
        if spec.dtype not in INT_DTYPES:
            raise CheckpointError(f"{name} is {spec}; an id table needs an integer dtype ({', '.join(INT_DTYPES)})")
        raw = self.raw(name)
        raw = raw.view(np.int8) if spec.dtype == "I8" else raw
        bad = (raw < 0) | (raw >= limit)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise CheckpointError(f"{name}: {int(bad.sum())} ids outside 0..{limit - 1} (n_routed_experts is "
                                  f"{limit}), e.g. {int(raw[at])} at {list(at)}")
        return raw.astype(np.int64)

    def quant_weight(self, prefix: str) -> QuantWeight:
        """`prefix.weight` (+ `prefix.scale`) as a QuantWeight: F8 → fp8, I8 → fp4, unscaled float → float."""
        w, sname = self.spec(f"{prefix}.weight"), f"{prefix}.scale"
        has_scale = sname in self._entries
        kind = {("F8_E4M3", True): "fp8", ("I8", True): "fp4", ("BF16", False): "float",
                ("F16", False): "float", ("F32", False): "float"}.get((w.dtype, has_scale))
        if kind is None:
            raise CheckpointError(f"{prefix}.weight is {w}{' with' if has_scale else ' without'} a .scale; "
                                  "expected F8_E4M3 or I8 with a scale, or BF16/F16/F32 without")
        scale = self.raw(sname) if has_scale else None
        if scale is not None and self.spec(sname).dtype not in ("F8_E8M0", "F32"):
            raise CheckpointError(f"{sname} is {self.spec(sname)}; expected F8_E8M0 or F32")
        shape = (w.shape[0], w.shape[1] * 2) if kind == "fp4" else w.shape
        try:
            return QuantWeight(kind, self.raw(f"{prefix}.weight"), scale, shape)
        except ValueError as e:
            raise CheckpointError(f"{prefix}: {e}") from None

    # ------------------------------------------------------------------ validation
    def validate(self, cfg: ModelConfig, values: bool = True, progress=None) -> None:
        """Raise ONE CheckpointError listing every problem `check` finds."""
        problems = self.check(cfg, values, progress)
        if problems:
            raise CheckpointError.listing(self.path, problems)

    def check(self, cfg: ModelConfig, values: bool = True, progress=None) -> list[str]:
        """Every broken file, every tensor that differs from schema(cfg) and, with `values`, every tensor
        holding NaN or Inf, one line each (none: the checkpoint is usable).  The value scan reads each
        tensor whose format has such codes (`nonfinite`): the float tensors, the scales and the FP8
        weights, 11% of V4-Flash's bytes (its FP4 experts have none); `progress(bytes_done, bytes_total)`
        follows it."""
        lines = list(self.problems)
        expected, scan = {}, []
        for weight in weight_schema(cfg).values():
            for want in weight.tensors:
                expected[want.name] = want
                wrong = self._mismatch(want, weight.role, cfg)
                lines += wrong
                if values and not wrong and want.dtype in NONFINITE:
                    scan.append(want)
        for name in sorted(set(self._entries) - set(expected)):
            entry = self._entries[name]
            lines.append(f"unexpected: {name} ({entry.spec or entry.problem})")
        total, done = sum(t.nbytes for t in scan), 0
        for want in scan:
            why = self.nonfinite(want.name)
            if why:
                lines.append(f"non-finite: {want.name}: {why}")
            done += want.nbytes
            if progress is not None:
                progress(done, total)
        return lines

    def _mismatch(self, want: TensorSpec, role: str, cfg: ModelConfig) -> list[str]:
        """What is wrong with the stored tensor `want.name` (nothing: []); a TABLE may use any integer dtype
        and is checked by value."""
        name, entry = want.name, self._entries.get(want.name)
        if entry is None:
            return [f"missing: {name} (expected {want})"]
        if entry.problem:
            return [f"unreadable: {name}: {entry.problem}"]
        table = role == TABLE and entry.spec.dtype in INT_DTYPES
        if entry.spec.dtype != want.dtype and not table:
            allowed = "an integer dtype" if role == TABLE else want.dtype
            return [f"wrong dtype: {name}: expected {allowed}, found {entry.spec.dtype}"]
        if entry.spec.shape != want.shape:
            return [f"wrong shape: {name}: expected {list(want.shape)}, found {list(entry.spec.shape)}"]
        if table:
            try:
                self.table(name, cfg.n_routed_experts)
            except CheckpointError as e:
                return [f"bad ids: {e}"]
        return []


# ---------------------------------------------------------------------- writer
def _check_raw(name: str, dtype: str, arr: np.ndarray) -> np.ndarray:
    if dtype not in NP_DTYPE:
        raise CheckpointError(f"{name}: unsupported dtype {dtype!r}; use one of {', '.join(NP_DTYPE)}")
    want = NP_DTYPE[dtype]
    arr = np.asarray(arr)
    if dtype == "I8" and arr.dtype == np.int8:
        arr = arr.view(np.uint8)
    if arr.dtype.newbyteorder("<") != want.newbyteorder("<"):
        raise CheckpointError(f"{name}: {dtype} must be given as raw {want} data, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=want)


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write `{name: (dtype_str, raw array)}` as one safetensors file (raw arrays as in `Checkpoint.raw`).

    Tensors are laid out widest item first and the header is space-padded to 8 bytes, so every tensor
    starts aligned and the memmap views the reader hands out are aligned too.
    """
    items = sorted(((n, d, _check_raw(n, d, a)) for n, (d, a) in tensors.items()), key=lambda x: -x[2].itemsize)
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, dtype, arr in items:
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, arr in items:
            f.write(arr.reshape(-1).view(np.uint8).data)


def save_sharded(out_dir, tensors: dict, max_shard_bytes: int) -> Path:
    """Split tensors (in the given order) into `model-0000N-of-0000M.safetensors` shards of at most
    `max_shard_bytes` each (a larger tensor gets a shard of its own), and write the official index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for name, (dtype, arr) in tensors.items():
        nbytes = np.asarray(arr).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(out_dir / fname, {n: tensors[n] for n in names})
        weight_map.update({n: fname for n in names})
        total += sum(np.asarray(tensors[n][1]).nbytes for n in names)
    index = out_dir / INDEX_NAME
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index

"""Checkpoint tensors → ONNX initializers stored as external data, written as the recorder asks for them.

Why stream to our own data file instead of `onnx.save(..., save_as_external_data=True)`: that path
builds every tensor inside one in-memory ModelProto first, which for V4 Flash (160 GB as stored) is
impossible.  Here each tensor is read, converted and appended to `model.onnx.data` the first time the
graph uses it, and the initializer only records (location, offset, length); the graph proto stays small
whatever the model size, and the main and MTP graphs share one data file.

Two weight modes (`WEIGHTS`):
* "quantized" (the default) keeps every weight in the checkpoint's own bytes: FP8 linears as e4m3 codes
  (typed float8e4m3fn) with their E8M0 128×128 block-scale bytes, each layer's routed experts as one
  bank per projection (packed e2m1 bytes [E, out, in/2] + E8M0 bytes per 32 inputs, or for -Base
  checkpoints e4m3 bytes + float32 block scales), BF16/F32 tensors as stored.  The data file is the
  checkpoint's size (id tables become int64: a few MB on Flash).  How the graph decodes them is in
  `QuantLinear` and `ExpertBank`.
* "float32" / "float16" / "bfloat16" dequantize FP8/FP4/BF16 weights to that dtype (float32 checkpoint
  tensors stay float32): the dense exports, 2–8× the checkpoint.

Either way the graph computes in float32 on exactly the values the reference dequantizes (`quant`), so a
quantized export has the float32 export's logits.  Integer tables (hash routing) become int64.

Linear weights are stored transposed ([in, out]) when the graph only uses them through `Ops.linear`, so
the exported MatMul needs no Transpose node; expert banks keep the checkpoint's [out, in] (the expert
matmul is a Gemm with transB).
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto

from ..portable import quant
from ..portable.checkpoint import EXPERTS, FP32, LINEAR, PLAIN, TABLE, weight_schema
from ..portable.weights import WeightStore, live_rows
from .symbolic import FLOAT, INT64, Graph, Sym

DENSE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
WEIGHTS = ("quantized", *DENSE)
_ITEM = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.INT64: 8,
         TensorProto.UINT8: 1, TensorProto.FLOAT8E4M3FN: 1}
_STORED = {"BF16": TensorProto.BFLOAT16, "F16": TensorProto.FLOAT16, "F32": TensorProto.FLOAT}
_BIG = 1 << 20          # tensors at least this large start on a 64 KiB boundary (mmap-friendly)
INT32 = TensorProto.INT32

# decode tables (exact): an E8M0 byte → 2^(b−127); a packed FP4 byte → its (low, high) e2m1 values; an
# e4m3 byte → its value (for the -Base FP8 expert banks, decoded after the runtime gather)
E8M0_TABLE = quant.e8m0_to_f32(np.arange(256))
FP4_PAIR_TABLE = quant.E2M1[quant.unpack_fp4(np.arange(256, dtype=np.uint8)[:, None])]       # [256, 2]
E4M3_TABLE = quant.e4m3_to_f32(np.arange(256))


def _encode(arr: np.ndarray, dtype: int) -> bytes:
    if dtype == TensorProto.BFLOAT16:
        a = np.asarray(arr)
        return (a if a.dtype == np.uint16 else quant.f32_to_bf16(a)).astype("<u2").tobytes()
    if dtype == TensorProto.FLOAT16:
        return arr.astype("<f2").tobytes()
    if dtype == TensorProto.INT64:
        return arr.astype("<i8").tobytes()
    if dtype in (TensorProto.UINT8, TensorProto.FLOAT8E4M3FN):
        return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    return arr.astype("<f4").tobytes()


class TensorSource:
    """What each checkpoint tensor the graph uses becomes in the export, decided by its role in the
    checkpoint schema and the weight mode: its graph-visible shape/type, stored type and bytes."""

    def __init__(self, cfg, ckpt, weights: str):
        if weights not in WEIGHTS:
            raise ValueError(f"export weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        self.cfg, self.ckpt, self.weights = cfg, ckpt, weights
        self.quantized = weights == "quantized"
        self.entries = weight_schema(cfg)
        self.roles = {t.name: e.role for e in self.entries.values() if e.role != EXPERTS for t in e.tensors
                      if not t.name.endswith(".scale")}

    @functools.cached_property
    def live_head(self) -> np.ndarray | None:
        """Ids of the head rows that are not all zeros, or None when every row is live (`graph.HeadRows`:
        the graphs then multiply only those rows)."""
        return live_rows(np.abs(self.ckpt.array("head.weight", np.float32)).max(-1))

    def used(self, mtp: bool) -> list[str]:
        """Schema entries the graphs read (the MTP block's only with `mtp`)."""
        return [n for n in self.entries if mtp or not n.startswith("mtp.")]

    def logical(self, name: str) -> tuple[tuple, int]:
        """(shape, element type) of a tensor as the graph sees it (FLOAT or INT64)."""
        role = self.roles[name]
        if role == LINEAR:
            return self.ckpt.quant_weight(name[:-7]).shape, FLOAT
        return self.ckpt.spec(name).shape, INT64 if role == TABLE else FLOAT

    def is_fp8(self, name: str) -> bool:
        """Whether a linear's weight stays e4m3 codes + block scales (decoded in the graph)."""
        return self.quantized and self.roles[name] == LINEAR and self.ckpt.quant_weight(name[:-7]).fmt == "fp8"

    def storage(self, name: str) -> int:
        """The stored element type of a float/int tensor (not of an FP8 linear's codes)."""
        role = self.roles[name]
        if role == TABLE:
            return TensorProto.INT64
        stored = self.ckpt.spec(name).dtype
        if self.quantized:
            return _STORED.get(stored, TensorProto.BFLOAT16)      # BF16 "float" linears stay BF16
        if role in (PLAIN, FP32) and stored == "F32":
            return TensorProto.FLOAT
        return DENSE[self.weights]

    def values(self, name: str) -> np.ndarray:
        """Decoded values (BF16 kept as raw words when they are stored as BF16)."""
        role = self.roles[name]
        if role == LINEAR:
            q = self.ckpt.quant_weight(name[:-7])
            if self.quantized and q.fmt == "float" and q.data.dtype == np.uint16:
                return q.data
            return quant.dequantize(q, np.float32)
        if role == TABLE:
            return self.ckpt.table(name, self.cfg.n_routed_experts)
        if self.quantized and self.ckpt.spec(name).dtype == "BF16":
            return self.ckpt.raw(name)
        return self.ckpt.array(name, np.float32)

    def entry_bytes(self, name: str) -> int:
        """Bytes the export stores for one schema entry (an expert bank: all its experts)."""
        entry = self.entries[name]
        if entry.role == EXPERTS:
            if self.quantized:
                return sum(t.nbytes for t in entry.tensors)
            return sum(int(np.prod(self.ckpt.quant_weight(p).shape)) for p in entry.linears()) * _ITEM[
                DENSE[self.weights]]
        shape, _ = self.logical(name)
        if self.is_fp8(name):
            return sum(t.nbytes for t in entry.tensors)
        return int(np.prod(shape)) * _ITEM[self.storage(name)]


class ExternalData:
    """The shared `model.onnx.data` file: one stored copy per (tensor, layout), however many graphs use it."""

    def __init__(self, path, source: TensorSource, progress=None, total: int = 0):
        self.path, self.source = path, source
        self._file = open(path, "wb")
        self.offset = 0
        self._written: dict = {}
        self.progress, self.total = progress, total

    def close(self) -> None:
        self._file.close()

    def add(self, name: str, dtype: int, dims, chunks) -> TensorProto:
        """Append the bytes of `chunks` (an iterable of arrays in `dtype`'s layout) as initializer `name`,
        once; later calls return the same initializer."""
        if name not in self._written:
            size = int(np.prod(dims)) * _ITEM[dtype]
            align = 65536 if size >= _BIG else 64
            self._file.write(b"\0" * (-self.offset % align))
            self.offset += -self.offset % align
            start = self.offset
            for chunk in chunks:
                data = _encode(chunk, dtype)
                self._file.write(data)
                self.offset += len(data)
                if self.progress:
                    self.progress(min(self.offset, self.total), self.total)
            if self.offset - start != size:
                raise ValueError(f"{name}: wrote {self.offset - start} bytes, expected {size}")
            t = TensorProto(name=name, data_type=dtype, dims=[int(d) for d in dims],
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", self.path.name), ("offset", str(start)), ("length", str(size))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            self._written[name] = t
        return self._written[name]


class Weight(Sym):
    """A checkpoint tensor seen by the graph as float32 (or int64) values; its initializer (and decode, for
    FP8 or half-precision storage) is emitted only when, and in the layout, the graph uses it."""

    __slots__ = ("store", "wname", "_t")

    def __init__(self, store: "ExportWeights", wname: str, shape, dtype):
        super().__init__(store.g, None, shape, dtype)
        self.store, self.wname, self._t = store, wname, None

    @property
    def name(self) -> str:
        if self._name is None:
            self._name = self.store.materialize(self.wname, transposed=False)
        return self._name

    def transposed(self) -> Sym:
        """The 2-D weight as [in, out], stored that way (no Transpose node)."""
        if self._t is None:
            self._t = Sym(self.g, self.store.materialize(self.wname, transposed=True), self.shape[::-1], self.dtype)
        return self._t

    def take(self, idx: Sym) -> Sym:
        """Rows `idx` (axis 0), gathered before any cast: an embedding held in BF16 stays BF16 in memory."""
        return self.store.take(self, idx)


class ExpertBank:
    """The routed experts of one layer as three stacked initializers (w1, w2, w3), read by a runtime expert
    id.  Why a bank: the MoE gathers one selected expert's stored bytes inside its Loop body and decodes
    them next to the expert's matmul (`decode`), so only the selected experts are decoded and computed, and
    no decode has constant inputs a runtime would fold into dense float weights at session load."""

    def __init__(self, store: "ExportWeights", entry):
        self.store, self.entry = store, entry
        self._stored: dict = {}

    def _proj(self, proj: str):
        if proj not in self._stored:
            self._stored[proj] = self.store.bank_tensors(self.entry, proj)
        return self._stored[proj]

    def decode(self, body: Graph, proj: str, e: str) -> Sym:
        """Expert `e`'s (a 0-d int64 value of `body`) `proj` weight as float32 [out, in], built in `body`."""
        src = self.store.data.source
        q0 = src.ckpt.quant_weight(f"{self.entry.name}0.{proj}")
        (m, n), (codes, scale) = q0.shape, self._proj(proj)
        row = body.node("Gather", [codes, e], axis=0)[0]
        if not src.quantized:
            w = row if DENSE[src.weights] == FLOAT else body.node("Cast", [row], to=FLOAT)[0]
            return Sym(body, w, (m, n), FLOAT)
        if q0.fmt == "fp4":
            pairs = _lookup(body, self.store.lut(FP4_PAIR_TABLE), row)                          # [m, n/2, 2]
            s = _lookup(body, self.store.lut(E8M0_TABLE), body.node("Gather", [scale, e], axis=0)[0])  # [m, n/32]
            blocks = body.node("Reshape", [pairs, body.vec([m, n // quant.FP4_BLOCK, quant.FP4_BLOCK])])[0]
            w = body.node("Mul", [blocks, body.node("Unsqueeze", [s, body.vec([-1])])[0]])[0]
            return Sym(body, body.node("Reshape", [w, body.vec([m, n])])[0], (m, n), FLOAT)
        vals = _lookup(body, self.store.lut(E4M3_TABLE), row)                                    # [m, n]
        s = body.node("Gather", [scale, e], axis=0)[0]                                           # [mb, nb]
        s = _block_expand(body, _block_expand(body, s, m, 0), n, 1)
        if q0.scale.dtype == np.uint8:
            s = _lookup(body, self.store.lut(E8M0_TABLE), s)
        return Sym(body, body.node("Mul", [vals, s])[0], (m, n), FLOAT)


def _lookup(g: Graph, table: str, codes: str) -> str:
    """table[codes] for uint8 codes: the exact decode of a byte format."""
    return g.node("Gather", [table, g.node("Cast", [codes], to=INT32)[0]], axis=0)[0]


def _block_expand(g: Graph, s: str, size: int, axis: int) -> str:
    """Repeat each entry of a 128-block scale along `axis` to cover `size` elements (the last block may be
    partial): a Gather with block indices i // 128."""
    idx = g.const(np.arange(size) // quant.FP8_BLOCK).name
    return g.node("Gather", [s, idx], axis=axis)[0]


class ExportWeights(WeightStore):
    """The graph's weight store `W` during recording (the schema-driven store of `portable.weights`): each
    conversion is a `Weight` symbol (or an `ExpertBank`) whose initializers are written when first used.

    Quantized FP8 linears decode with `DequantizeLinear` (float8e4m3fn codes, block_size 128 along the
    input axis, the E8M0 bytes mapped to float32 and repeated along the output axis).  Why that op: every
    runtime keeps a DequantizeLinear of a constant weight as is (it is the standard QDQ form; onnxruntime's
    constant folding skips it), so the weight stays 1 byte per value in memory and is decoded per use,
    while the scale chain (≤ 1/128 of the weight's elements) may be folded.  A decode built from Cast/
    Gather on the initializer would instead be folded at load into a float32 copy, 4× the weight.  The
    price is the decode in every step: on onnxruntime's CPU provider a float8 DequantizeLinear costs a few
    ns per weight (an FP4 expert's lookup decode about as much), against ~0.2 ns for a float32 MatMul's
    read, so a step runs several times slower than a float32 export's where that one fits in memory
    (`benchmarks/onnx_export.py`: 3.7× on the tiny model's decode, 9× on its medium one); its memory is the
    checkpoint's.
    (float4e2m1 DequantizeLinear, opset 23, and bfloat16 scales have no CPU kernel in onnxruntime 1.32.)"""

    def __init__(self, g: Graph, data: ExternalData):
        super().__init__(data.source.cfg, data.source.ckpt)
        self.g, self.data = g, data
        self._added: set = set()

    def _weight(self, name: str) -> Weight:
        shape, dtype = self.data.source.logical(name)
        return Weight(self, name, shape, dtype)

    def linear(self, prefix: str) -> Weight:
        return self._weight(prefix + ".weight")

    plain = table = _weight

    def bank(self, entry) -> ExpertBank:
        return ExpertBank(self, entry)

    # ---------------------------------------------------------------- initializers
    def _init(self, t: TensorProto) -> str:
        if t.name not in self._added:
            self._added.add(t.name)
            self.g.initializers.append(t)
        return t.name

    def lut(self, values: np.ndarray) -> str:
        """A decode table (a small graph constant)."""
        return self.g.const(values).name

    def _stored(self, name: str, transposed: bool) -> tuple[str, int]:
        """(initializer name, stored type) of a float/int tensor, written on first use."""
        src = self.data.source
        dtype = src.storage(name)
        shape, _ = src.logical(name)

        def chunks():
            arr = src.values(name)
            yield np.ascontiguousarray(arr.T) if transposed else arr
        dims = shape[::-1] if transposed else shape
        return self._init(self.data.add(name + (".T" if transposed else ""), dtype, dims, chunks())), dtype

    def _cast(self, value: str, dtype: int) -> str:
        return value if dtype in (FLOAT, INT64) else self.g.node("Cast", [value], to=FLOAT)[0]

    def materialize(self, name: str, transposed: bool) -> str:
        """The float32 (int64) value of `name` in the graph, [in, out] when `transposed`."""
        if self.data.source.is_fp8(name):
            return self._dequantize(name[:-7], transposed)
        return self._cast(*self._stored(name, transposed))

    def take(self, w: Weight, idx: Sym) -> Sym:
        value, dtype = self._stored(w.wname, transposed=False)
        rows = self.g.node("Gather", [value, idx], axis=0)[0]
        return Sym(self.g, self._cast(rows, dtype), idx.shape + w.shape[1:], w.dtype)

    def _scale_f32(self, value: str, dtype: int) -> str:
        return _lookup(self.g, self.lut(E8M0_TABLE), value) if dtype == TensorProto.UINT8 else value

    def _dequantize(self, prefix: str, transposed: bool) -> str:
        q = self.ckpt.quant_weight(prefix)
        m, n = q.shape
        codes = self.data.add(prefix + (".weight.T" if transposed else ".weight"), TensorProto.FLOAT8E4M3FN,
                              (n, m) if transposed else (m, n), iter([q.data.T if transposed else q.data]))
        sdt = TensorProto.UINT8 if q.scale.dtype == np.uint8 else TensorProto.FLOAT
        scale = self.data.add(prefix + ".scale", sdt, q.scale.shape, iter([np.asarray(q.scale)]))
        s = self._scale_f32(self._init(scale), sdt)                                   # [mb, nb] float32
        if transposed:                                                                # codes [n, m]: blocks on axis 0
            s = _block_expand(self.g, self.g.node("Transpose", [s], perm=[1, 0])[0], m, 1)        # [nb, m]
        else:                                                                         # codes [m, n]: blocks on axis 1
            s = _block_expand(self.g, s, m, 0)                                                    # [m, nb]
        return self.g.node("DequantizeLinear", [self._init(codes), s], axis=0 if transposed else 1,
                           block_size=quant.FP8_BLOCK)[0]

    def bank_tensors(self, entry, proj: str) -> tuple[str, str | None]:
        """(codes, scale) initializer names of one projection of an expert bank, stacked over the experts
        ([E, ...] each, in the checkpoint's layout; scale None for a dense export)."""
        src = self.data.source
        prefixes = [f"{entry.name}{e}.{proj}" for e in range(entry.experts)]
        q0 = src.ckpt.quant_weight(prefixes[0])
        name = f"{entry.name}{proj}"
        E = entry.experts
        if not src.quantized:
            dtype = DENSE[src.weights]
            codes = self.data.add(name, dtype, (E, *q0.shape),
                                  (quant.dequantize(src.ckpt.quant_weight(p), np.float32) for p in prefixes))
            return self._init(codes), None
        codes = self.data.add(name + ".weight", TensorProto.UINT8, (E, *q0.data.shape),
                              (src.ckpt.quant_weight(p).data for p in prefixes))
        sdt = TensorProto.UINT8 if q0.scale.dtype == np.uint8 else TensorProto.FLOAT
        scale = self.data.add(name + ".scale", sdt, (E, *q0.scale.shape),
                              (np.asarray(src.ckpt.quant_weight(p).scale) for p in prefixes))
        return self._init(codes), self._init(scale)

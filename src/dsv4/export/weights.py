"""Checkpoint tensors → ONNX initializers stored as external data, written as the recorder asks for them.

Why stream to our own data file instead of `onnx.save(..., save_as_external_data=True)`: that path
builds every tensor inside one in-memory ModelProto first, which for V4 Flash (hundreds of GB once
dequantized) is impossible.  Here each tensor is decoded, converted and appended to `model.onnx.data`
the first time the graph uses it, and the initializer only records (location, offset, length); the
graph proto stays small whatever the model size, and the main and MTP graphs share one data file.

Storage precision: FP8/FP4/BF16 weights are dequantized to the export dtype (float32, float16 or
bfloat16); tensors the checkpoint keeps in float32 (mHC parameters, sinks, compressor `ape`, ...) stay
float32, exactly as the reference backend sees them; integer tables (hash routing) become int64.
Each tensor's treatment follows its role in the checkpoint schema.  The
graph casts stored values to float32 where they are used, so compute is float32 for every export dtype.

Linear weights are stored transposed ([in, out]) when the graph only uses them through `Ops.linear`,
so the exported MatMul needs no Transpose node that a runtime would have to fold at load time.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..portable import quant
from ..portable.checkpoint import EXPERTS, FP32, LINEAR, PLAIN, TABLE, weight_schema
from ..portable.weights import WeightStore
from .symbolic import FLOAT, INT64, Graph, Sym

STORAGE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_ITEM = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.INT64: 8}
_BIG = 1 << 20          # tensors at least this large start on a 64 KiB boundary (mmap-friendly)


def _encode(arr: np.ndarray, dtype: int) -> bytes:
    if dtype == TensorProto.BFLOAT16:
        return quant.f32_to_bf16(arr).astype("<u2").tobytes()
    if dtype == TensorProto.FLOAT16:
        return arr.astype("<f2").tobytes()
    if dtype == TensorProto.INT64:
        return arr.astype("<i8").tobytes()
    return arr.astype("<f4").tobytes()


class TensorSource:
    """What each checkpoint tensor the graph uses becomes in the export: its graph-visible shape/type and
    stored bytes, decided by its role in the checkpoint schema."""

    def __init__(self, cfg, ckpt, dtype: str):
        if dtype not in STORAGE:
            raise ValueError(f"export dtype must be one of {', '.join(STORAGE)}, got {dtype!r}")
        self.cfg, self.ckpt, self.dtype = cfg, ckpt, dtype
        self.roles = {t.name: e.role for e in weight_schema(cfg).values() for t in e.tensors
                      if not t.name.endswith(".scale")}

    def names(self) -> list[str]:
        """The tensors the graph reads (every linear by its `.weight`; scales go into the dequantized value)."""
        return list(self.roles)

    def logical(self, name: str) -> tuple[tuple, int]:
        """(shape, element type) of a tensor as the graph sees it (FLOAT or INT64)."""
        role = self.roles[name]
        if role in (LINEAR, EXPERTS):
            return self.ckpt.quant_weight(name[:-7]).shape, FLOAT
        return self.ckpt.spec(name).shape, INT64 if role == TABLE else FLOAT

    def storage(self, name: str) -> int:
        role = self.roles[name]
        if role == TABLE:
            return TensorProto.INT64
        if role in (PLAIN, FP32) and self.ckpt.spec(name).dtype == "F32":
            return TensorProto.FLOAT
        return STORAGE[self.dtype]

    def values(self, name: str) -> np.ndarray:
        role = self.roles[name]
        if role in (LINEAR, EXPERTS):
            return quant.dequantize(self.ckpt.quant_weight(name[:-7]), np.float32)
        if role == TABLE:
            return self.ckpt.table(name, self.cfg.n_routed_experts)
        return self.ckpt.array(name, np.float32)

    def stored_bytes(self, name: str) -> int:
        shape, _ = self.logical(name)
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

    def tensor(self, name: str, transposed: bool) -> TensorProto:
        """The initializer (external reference) for `name`, written on first use."""
        key = (name, transposed)
        if key not in self._written:
            arr = self.source.values(name)
            if transposed:
                arr = np.ascontiguousarray(arr.T)
            dtype = self.source.storage(name)
            data = _encode(arr, dtype)
            align = 65536 if len(data) >= _BIG else 64
            pad = -self.offset % align
            self._file.write(b"\0" * pad + data)
            self.offset += pad
            t = TensorProto(name=name + (".T" if transposed else ""), data_type=dtype, dims=list(arr.shape),
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            self.offset += len(data)
            self._written[key] = t
            if self.progress:
                self.progress(min(self.offset, self.total), self.total)
        return self._written[key]


class Weight(Sym):
    """A checkpoint tensor seen by the graph; its initializer is emitted only when (and as) it is used."""

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


class ExportWeights(WeightStore):
    """The graph's weight store `W` during recording (the schema-driven store of `portable.weights`): each
    conversion is a `Weight` symbol whose initializer is written when the graph first uses it."""

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

    def materialize(self, name: str, transposed: bool) -> str:
        t = self.data.tensor(name, transposed)
        if t.name not in self._added:
            self._added.add(t.name)
            self.g.initializers.append(t)
        if t.data_type in (FLOAT, INT64):
            return t.name
        return self.g.node("Cast", [t.name], to=FLOAT)[0]

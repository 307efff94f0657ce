"""`Ops` that record ONNX nodes: every primitive maps to one standard ONNX operator (opset 21).

The composites of `portable/ops.py` (rms_norm, rope, mHC, sink attention, indexer top-k, compressor
pooling, experts) are inherited unchanged, so the exported graph is the portable decomposition itself.
Four are specialised, all exact rewrites of the default:
* `linear` multiplies by a weight stored transposed (see `weights.py`), avoiding a Transpose node; an
  expert weight decoded in the MoE loop ([out, in], as stored) is read by a Gemm with transB.
* `take` of a stored table gathers its rows before casting them to float32, so a BF16 embedding stays
  BF16 in the runtime's memory.
* `moe` computes only the experts some token picked: one ONNX Loop per MoE layer over the sorted distinct
  expert ids of the step (Unique), whose body selects that expert's tokens (NonZero + Gather), gathers
  and decodes its stored weights (`weights.ExpertBank`), runs the expert and adds the result back per
  token (ScatterND-add).  Per token this is the same sum of the same expert outputs, in the same expert
  order, as the default dense loop that runs every expert on every token; a one-token decode step of
  V4 (6 of 256 experts) runs 6 iterations, and the graph holds one Loop per layer instead of 256 copies
  of the expert.
* `indexer_topk` appends k never-visible rows, because `trim` makes the stored keys a run-time number of
  rows (those visible) that may be fewer than the k columns ONNX TopK needs.

State writes are not ops: `write_rows` returns a `RowWrite` record of (buffer, row indices, rows), and the
exporter makes the indices and rows graph outputs (`present.<name>.index` / `.rows`), which the runtime
writes into its own buffers in place.  A step's outputs are thus its new rows, never a copy of a state
buffer, and the graph never reads a buffer after writing it (a `RowWrite` cannot be an op input).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from ..portable.ops import Ops
from .symbolic import BOOL, FLOAT, INT64, Dim, Graph, Sym, TraceError, broadcast, is_int
from .weights import Weight

_KIND = {"float": FLOAT, "int": INT64, "bool": BOOL}
_NP = {"float": np.float32, "int": np.int64, "bool": np.bool_}
ACT_TYPES = {"float32": None, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


class RowWrite(Sym):
    """The new rows of one state buffer (`rows` [B,M,...] at row indices `index` [B,M]) in place of the
    updated buffer; using it as an op input raises, which is the graph's "no read after write" rule."""

    __slots__ = ("past", "index", "rows")

    def __init__(self, buf: Sym, index: Sym, rows: Sym):
        super().__init__(buf.g, None, buf.shape, buf.dtype)
        self.past, self.index, self.rows = buf.name, index, rows

    @property
    def name(self) -> str:
        raise TraceError(f"state buffer {self.past!r} was read after write_rows wrote it; the graph must "
                         f"read every buffer before writing its new rows")


class OnnxOps(Ops):
    name = "onnx-export"

    def __init__(self, g: Graph, dtype: str = "float32"):
        self.g = g
        self.act_type = ACT_TYPES[dtype]

    # dtype points: compute is float32; act() rounds to the export dtype like the reference's bf16 mode
    def act(self, x):
        if self.act_type is None or x.dtype != FLOAT:
            return x
        return self._unary("Cast", self._unary("Cast", x, to=self.act_type), to=FLOAT)

    # ------------------------------------------------------------------ helpers
    def _unary(self, op, x, **attrs):
        return self.g.op(op, [x], x.shape, attrs.get("to", x.dtype) if op == "Cast" else x.dtype, **attrs)

    def _axes(self, axis):
        return self.g.const(np.asarray([axis], dtype=np.int64))

    # ------------------------------------------------------------------ primitives
    def asarray(self, x, kind="float"):
        return self.g.const(np.asarray(x, dtype=_NP[kind]))

    def to_numpy(self, x):
        raise TraceError("tensor values do not exist while recording an ONNX graph")

    def full(self, shape, value, kind="float"):
        val = helper.make_tensor("value", _KIND[kind], [1], [value])
        return self.g.op("ConstantOfShape", [self.g.vec(shape)], shape, _KIND[kind], value=val)

    def zeros(self, shape, kind="float"):
        return self.full(shape, 0, kind)

    def arange(self, n):
        if is_int(n):
            return self.g.const(np.arange(n, dtype=np.int64))
        g = self.g
        return g.op("Range", [g.scalar(0), g.scalar(n), g.scalar(1)], (n,), INT64)

    def to_float(self, x):
        return self._unary("Cast", x, to=FLOAT)

    def matmul(self, a, b):
        shape = broadcast(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        return self.g.op("MatMul", [a, b], shape, FLOAT)

    def exp(self, x): return self._unary("Exp", x)
    def log(self, x): return self._unary("Log", x)
    def sqrt(self, x): return self._unary("Sqrt", x)
    def abs(self, x): return self._unary("Abs", x)
    def cos(self, x): return self._unary("Cos", x)
    def sin(self, x): return self._unary("Sin", x)

    def maximum(self, a, b):
        return self.g.binary("Max", a, b)

    def minimum(self, a, b):
        return self.g.binary("Min", a, b)

    def where(self, cond, a, b):
        like = a if isinstance(a, Sym) else b
        a, b = self.g.lift(a, like), self.g.lift(b, like)
        return self.g.op("Where", [cond, a, b], broadcast(cond.shape, broadcast(a.shape, b.shape)), a.dtype)

    def _reduce(self, op, x, axis, keepdims):
        axis = axis % x.ndim
        shape = x.shape[:axis] + ((1,) if keepdims else ()) + x.shape[axis + 1:]
        return self.g.op(op, [x, self._axes(axis)], shape, x.dtype, keepdims=int(keepdims))

    def sum(self, x, axis, keepdims=False):
        return self._reduce("ReduceSum", x, axis, keepdims)

    def max(self, x, axis, keepdims=False):
        return self._reduce("ReduceMax", x, axis, keepdims)

    def reshape(self, x, shape):
        shape = list(shape)
        holes = [i for i, d in enumerate(shape) if is_int(d) and d == -1]
        if len(holes) > 1:
            raise TraceError(f"reshape to {shape}: at most one -1")
        out = list(shape)
        if holes:
            out[holes[0]] = self._infer_hole(x.shape, [d for i, d in enumerate(shape) if i != holes[0]])
        y = self.g.op("Reshape", [x, self.g.vec(shape)], out, x.dtype, allowzero=1)   # sizes may be 0 (trim)
        if holes and out[holes[0]] is None:
            y.shape = tuple(self.g.dim_of(y, i) if d is None else d for i, d in enumerate(out))
        return y

    @staticmethod
    def _infer_hole(src, known):
        """The size a −1 stands for when it follows from the shapes alone (None: read it at run time)."""
        dims = list(src)
        ints_known = 1
        for d in known:
            if is_int(d):
                ints_known *= d
                continue
            match = next((i for i, s in enumerate(dims) if isinstance(s, Dim) and s.key == d.key), None)
            if match is None:
                return None
            dims.pop(match)
        total = 1
        for d in dims:
            total = total * d
        if is_int(total):
            return total // ints_known
        scale = math.prod(d for d in dims if is_int(d))
        if scale % ints_known:
            return None
        sym = 1
        for d in dims:
            if not is_int(d):
                sym = sym * d
        return sym * (scale // ints_known)

    def transpose(self, x, axes):
        return self.g.op("Transpose", [x], tuple(x.shape[a] for a in axes), x.dtype, perm=list(axes))

    def concat(self, xs, axis):
        axis = axis % xs[0].ndim
        size = 0
        for x in xs:
            size = size + x.shape[axis]
        shape = xs[0].shape[:axis] + (size,) + xs[0].shape[axis + 1:]
        return self.g.op("Concat", list(xs), shape, xs[0].dtype, axis=axis)

    def broadcast_to(self, x, shape):
        return self.g.op("Expand", [x, self.g.vec(shape)], shape, x.dtype)

    def take(self, x, idx, axis=0):
        if isinstance(x, Weight) and axis == 0:
            return x.take(idx)
        axis = axis % x.ndim
        return self.g.op("Gather", [x, idx], x.shape[:axis] + idx.shape + x.shape[axis + 1:], x.dtype, axis=axis)

    def take_along_axis(self, x, idx, axis=-1):
        return self.g.op("GatherElements", [x, idx], idx.shape, x.dtype, axis=axis % x.ndim)

    def widen(self, x, idx, size):
        shape = x.shape[:-1] + (size,)
        return self.g.op("ScatterElements", [self.zeros(shape), self.broadcast_to(idx, x.shape), x], shape, x.dtype,
                         axis=x.ndim - 1)

    def _unsqueeze_last(self, idx):
        return self.g.op("Unsqueeze", [idx, self._axes(-1)], idx.shape + (1,), idx.dtype)

    def gather_rows(self, x, idx):
        return self.g.op("GatherND", [x, self._unsqueeze_last(idx)], idx.shape + x.shape[2:], x.dtype, batch_dims=1)

    def write_rows(self, buf, idx, rows):
        if isinstance(buf, RowWrite):
            raise TraceError(f"state buffer {buf.past!r} is written twice in one step")
        if rows.dtype != buf.dtype:
            raise TraceError(f"rows of {rows.dtype} written into a state buffer of {buf.dtype}")
        return RowWrite(buf, idx, rows)

    def trim(self, buf, count):
        """Rows 0..max(count)−1 of a state buffer (a Slice with a run-time end), so attention and the
        indexer cost the entries some query sees, not the capacity the buffer was sized for."""
        g = self.g
        end = g.op("ReduceMax", [self.reshape(count, [-1])], (1,), INT64, keepdims=1)
        y = g.op("Slice", [buf, g.vec([0]), end, g.vec([1])], buf.shape, buf.dtype)
        y.shape = (buf.shape[0], g.dim_of(y, 1)) + tuple(buf.shape[2:])
        return y

    def topk(self, x, k):
        kk = self.g.const(np.asarray([k], dtype=np.int64))
        _, ind = self.g.node("TopK", [x, kk], n_out=2, axis=-1, largest=1, sorted=1)
        return Sym(self.g, ind, x.shape[:-1] + (k,), INT64)

    def dense(self, w):
        return w

    # ------------------------------------------------------------------ specialised composites
    def indexer_topk(self, qi, w, segments, k):
        """The default, with k never-visible rows appended: trimmed key segments may hold fewer than k rows
        at run time, and ONNX TopK needs k columns.  Padding rows score −inf, so they are never picked."""
        b, s = qi.shape[:2]
        pad = (self.zeros((b, k, qi.shape[3])), self.zeros((b, s), "int"))
        return super().indexer_topk(qi, w, list(segments) + [pad], k)[:-1]

    def linear(self, x, w):
        if isinstance(w, Weight) and w.ndim == 2:
            return self.matmul(x, w.transposed())
        if w.ndim == 2 and x.ndim == 2:                     # an expert weight decoded in the MoE loop
            return self.g.op("Gemm", [x, w], (x.shape[0], w.shape[0]), FLOAT, transB=1)
        return super().linear(x, w)

    def moe(self, x, idx, wts, experts, limit):
        """Only the picked experts, in one Loop (see the module docstring); `experts` is an `ExpertBank`."""
        g = self.g
        n, d = x.shape
        used = g.op("Unique", [self.reshape(idx, [-1])], (None,), INT64, sorted=1)          # distinct ids, sorted
        used.shape = (g.dim_of(used, 0),)
        body = Graph(g.name + "_moe", prefix=g.fresh("moe") + "/")
        o = OnnxOps(body)
        o.act_type = self.act_type
        it, cond, acc = (body.fresh(h) for h in ("iter", "cond", "acc"))
        body.add_input(it, INT64, [])
        body.add_input(cond, BOOL, [])
        body.add_input(acc, FLOAT, ["tokens", d])
        e = Sym(body, body.node("Gather", [used.name, it], axis=0)[0], (), INT64)            # this iteration's expert
        picked = Sym(body, idx.name, idx.shape, INT64) == e                                   # [N, k] (outer values)
        coef = o.sum(o.where(picked, Sym(body, wts.name, wts.shape, FLOAT), 0.0), -1)        # [N]
        hit = o.max(o.where(picked, body.const(np.int64(1)), 0), -1)                         # [N] 0/1
        tok = body.op("Reshape", [body.op("NonZero", [hit], (1, None), INT64), body.vec([-1])], (None,), INT64)
        tok.shape = (body.dim_of(tok, 0),)
        w1, w2, w3 = (experts.decode(body, p, e.name) for p in ("w1", "w2", "w3"))
        y = o.expert(o.take(Sym(body, x.name, x.shape, FLOAT), tok, 0), w1, w2, w3, limit, coef=o.take(coef, tok, 0))
        out = body.op("ScatterND", [Sym(body, acc, (n, d), FLOAT), o._unsqueeze_last(tok), y], (n, d), FLOAT,
                      reduction="add")
        body.add_output(body.fresh("cond_out"), Sym(body, cond, (), BOOL), [])
        body.add_output(body.fresh("acc_out"), out, ["tokens", d])
        loop = g.node("Loop", [g.scalar(used.shape[0]), "", self.zeros((n, d))], body=body.proto())[0]
        return Sym(g, loop, (n, d), FLOAT)

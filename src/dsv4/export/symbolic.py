"""Symbolic tensors and dimensions that record ONNX nodes while `portable/graph.py` runs on them.

Why a recorder of our own: the graph is written against `Ops` plus the Python operators numpy, mlx and
torch share (+ - * / // % < <= >= == unary -, constant slicing).  Running it once on `Sym` values that
append ONNX nodes instead of computing yields an ONNX graph that *is* the portable graph, op for op,
with no second description of V4 to keep in sync (a torch.onnx export would instead trace the CUDA
backend, whose kernels are a second description, and would drag torch into every export).

Dynamic batch, sequence length and state capacity: the graph reads shapes (`b, s = ids.shape`) and does
integer arithmetic on them (`s * k`, `(s + m - 1) // m`, `keys[:, s:]`, `capacity // m`).  A `Dim` is such
an integer known only at run time, kept as a linear form Σ coeff·atom + const over runtime atoms (the
input's batch and sequence sizes, the capacity, and opaque results such as `(s + 3) // 4`).  Linear
forms simplify the way the graph needs — `(W + s) − s` is the static `W` again, so the window state keeps
its static shape — and a form is lowered to a handful of int64 scalar nodes only where a value is needed
(a Reshape target, a Range, a Slice start).  A Python `if` on a `Dim` or a `Sym` raises, which is how a
non-traceable graph edit would be caught at export time.
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx import TensorProto, helper, numpy_helper

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
NP_OF = {FLOAT: np.float32, INT64: np.int64, BOOL: np.bool_}
_CMP = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"}


class TraceError(TypeError):
    """The graph asked for something a recorded ONNX graph cannot express (a value at export time)."""


# ---------------------------------------------------------------------- dimensions
class Dim:
    """A run-time integer Σ coeff·atom + const; arithmetic with ints and Dims stays symbolic."""

    __slots__ = ("g", "terms", "const")

    def __init__(self, g: "Graph", terms: tuple, const: int):
        self.g, self.terms, self.const = g, terms, const

    @property
    def key(self):
        return self.terms, self.const

    def __add__(self, o):
        if isinstance(o, Dim):
            t = dict(self.terms)
            for a, c in o.terms:
                t[a] = t.get(a, 0) + c
            return self.g.form(t, self.const + o.const)
        if isinstance(o, (int, np.integer)):
            return self.g.form(dict(self.terms), self.const + int(o))
        return NotImplemented

    __radd__ = __add__

    def __neg__(self):
        return self.g.form({a: -c for a, c in self.terms}, -self.const)

    def __sub__(self, o):
        return self + (-o)

    def __rsub__(self, o):
        return (-self) + o

    def __mul__(self, o):
        if isinstance(o, (int, np.integer)):
            return self.g.form({a: c * int(o) for a, c in self.terms}, self.const * int(o))
        if isinstance(o, Dim):
            return self.g.atom("Mul", self, o)
        return NotImplemented

    __rmul__ = __mul__

    def __floordiv__(self, o):
        if isinstance(o, (int, np.integer)) and all(c % o == 0 for _, c in self.terms) and self.const % o == 0:
            return self.g.form({a: c // int(o) for a, c in self.terms}, self.const // int(o))
        return self.g.atom("FloorDiv", self, o)

    def __mod__(self, o):
        return self.g.atom("Mod", self, o)

    def _no_value(self, *_):
        raise TraceError("a batch/sequence-dependent size was used as a Python value while exporting; "
                         "the graph must keep it symbolic (use it in shapes or tensor arithmetic)")

    __index__ = __int__ = __bool__ = __lt__ = __le__ = __gt__ = __ge__ = _no_value
    __hash__ = object.__hash__

    def __repr__(self):
        return "Dim(" + " + ".join([f"{c}·a{a}" for a, c in self.terms] + [str(self.const)]) + ")"


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def broadcast(a: tuple, b: tuple) -> tuple:
    """Numpy broadcasting of shapes whose entries may be Dims (a static size > 1 wins over a Dim)."""
    out = []
    for x, y in itertools.zip_longest(reversed(a), reversed(b), fillvalue=1):
        if is_int(x) and x == 1:
            out.append(y)
        elif is_int(y) and y == 1 or x is y:
            out.append(x)
        elif is_int(x) and is_int(y):
            if x != y:
                raise TraceError(f"shapes {a} and {b} do not broadcast")
            out.append(x)
        else:
            out.append(x if is_int(x) else y)
    return tuple(reversed(out))


# ---------------------------------------------------------------------- tensors
class Sym:
    """A recorded tensor: an ONNX value name, a shape of ints/Dims and an element type (FLOAT|INT64|BOOL)."""

    __slots__ = ("g", "_name", "shape", "dtype")
    __array_ufunc__ = None          # numpy scalars on the left defer to our reflected operators
    __hash__ = object.__hash__

    def __init__(self, g: "Graph", name, shape, dtype):
        self.g, self._name, self.shape, self.dtype = g, name, tuple(shape), dtype

    @property
    def name(self) -> str:
        return self._name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __bool__(self):
        raise TraceError("a tensor value was used in Python control flow while exporting")

    def _bin(self, op, o, reverse=False):
        return self.g.binary(op, o, self) if reverse else self.g.binary(op, self, o)

    def __add__(self, o): return self._bin("Add", o)
    def __radd__(self, o): return self._bin("Add", o, True)
    def __sub__(self, o): return self._bin("Sub", o)
    def __rsub__(self, o): return self._bin("Sub", o, True)
    def __mul__(self, o): return self._bin("Mul", o)
    def __rmul__(self, o): return self._bin("Mul", o, True)
    def __truediv__(self, o): return self._bin("Div", o)
    def __rtruediv__(self, o): return self._bin("Div", o, True)
    def __floordiv__(self, o): return self._bin("FloorDiv", o)
    def __mod__(self, o): return self._bin("Mod", o)
    def __lt__(self, o): return self._bin("Less", o)
    def __le__(self, o): return self._bin("LessOrEqual", o)
    def __gt__(self, o): return self._bin("Greater", o)
    def __ge__(self, o): return self._bin("GreaterOrEqual", o)
    def __eq__(self, o): return self._bin("Equal", o)
    def __neg__(self): return self.g.op("Neg", [self], self.shape, self.dtype)
    def __getitem__(self, key): return self.g.getitem(self, key)


# ---------------------------------------------------------------------- the graph being recorded
class Graph:
    """Nodes, initializers, inputs and outputs of one ONNX graph, plus the constant and Dim caches."""

    def __init__(self, name: str, prefix: str = ""):
        self.name, self.prefix = name, prefix        # prefix: unique value names for a subgraph (Loop body)
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._ids = itertools.count()
        self._consts: dict = {}
        self._atoms: list = []          # atom id → scalar int64 value name
        self._atom_keys: dict = {}
        self._scalars: dict = {}        # Dim key → scalar name
        self._vecs: dict = {}           # Dim key → [1] name

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}{hint}_{next(self._ids)}"

    # ---------------------------------------------------------------- nodes
    def node(self, op_type: str, inputs: list, n_out: int = 1, **attrs) -> list[str]:
        names = [i.name if isinstance(i, Sym) else i for i in inputs]
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, names, outs, name=outs[0], **attrs))
        return outs

    def op(self, op_type: str, inputs: list, shape, dtype, **attrs) -> Sym:
        return Sym(self, self.node(op_type, inputs, **attrs)[0], shape, dtype)

    def const(self, value) -> Sym:
        """A small constant (cached by value), stored inside the graph."""
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            dtype = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64, np.dtype(np.bool_): BOOL}[arr.dtype]
            self._consts[key] = Sym(self, name, arr.shape, dtype)
        return self._consts[key]

    def add_input(self, name: str, dtype, shape_labels: list) -> None:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape_labels))

    def add_output(self, name: str, value: Sym, shape_labels: list) -> None:
        self.nodes.append(helper.make_node("Identity", [value.name], [name], name=name))
        self.outputs.append(helper.make_tensor_value_info(name, value.dtype, shape_labels))

    # ---------------------------------------------------------------- dims
    def form(self, terms: dict, const: int):
        terms = tuple(sorted((a, c) for a, c in terms.items() if c))
        return Dim(self, terms, const) if terms else const

    def new_atom(self, scalar_name: str) -> Dim:
        self._atoms.append(scalar_name)
        return Dim(self, ((len(self._atoms) - 1, 1),), 0)

    def atom(self, op: str, a, b) -> Dim:
        """An opaque Dim computed from two Dims/ints (product, floor division, modulo)."""
        key = (op, a.key if isinstance(a, Dim) else a, b.key if isinstance(b, Dim) else b)
        if key not in self._atom_keys:
            sa, sb = self.scalar(a), self.scalar(b)
            if op == "Mul":
                name = self.node("Mul", [sa, sb])[0]
            elif op == "Mod":
                name = self.node("Mod", [sa, sb], fmod=0)[0]
            else:                                   # floor division, exact for any signs
                r = self.node("Mod", [sa, sb], fmod=0)[0]
                name = self.node("Div", [self.node("Sub", [sa, r])[0], sb])[0]
            self._atom_keys[key] = self.new_atom(name)
        return self._atom_keys[key]

    def dim_of(self, x: Sym, axis: int) -> Dim:
        """The run-time size of one axis of a recorded tensor."""
        shape = self.node("Shape", [x])[0]
        return self.new_atom(self.node("Gather", [shape, self.const(np.int64(axis)).name], axis=0)[0])

    def scalar(self, d) -> str:
        """A 0-d int64 value name for an int or a Dim."""
        if is_int(d):
            return self.const(np.int64(d)).name
        if d.key not in self._scalars:
            acc = None
            for a, c in d.terms:
                t = self._atoms[a] if c == 1 else self.node("Mul", [self._atoms[a], self.scalar(c)])[0]
                acc = t if acc is None else self.node("Add", [acc, t])[0]
            if d.const:
                acc = self.node("Add", [acc, self.scalar(d.const)])[0]
            self._scalars[d.key] = acc
        return self._scalars[d.key]

    def vec(self, dims) -> str:
        """A 1-d int64 value name holding a list of ints/Dims (a shape, slice starts, ...)."""
        dims = list(dims)
        if all(is_int(d) for d in dims):
            return self.const(np.asarray(dims, dtype=np.int64)).name
        parts, run = [], []
        for d in dims:
            if is_int(d):
                run.append(int(d))
                continue
            if run:
                parts.append(self.const(np.asarray(run, dtype=np.int64)).name)
                run = []
            if d.key not in self._vecs:
                self._vecs[d.key] = self.node("Unsqueeze", [self.scalar(d), self.const(np.asarray([0])).name])[0]
            parts.append(self._vecs[d.key])
        if run:
            parts.append(self.const(np.asarray(run, dtype=np.int64)).name)
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, axis=0)[0]

    # ---------------------------------------------------------------- operator helpers
    def lift(self, v, like: Sym) -> Sym:
        """A Python number or Dim as a 0-d constant of `like`'s element type."""
        if isinstance(v, Sym):
            return v
        if isinstance(v, Dim):
            if like.dtype != INT64:
                raise TraceError("a size was combined with a float tensor; convert explicitly")
            return Sym(self, self.scalar(v), (), INT64)
        if isinstance(v, (bool, np.bool_)):
            raise TraceError("boolean Python constants are not used by the graph")
        if like.dtype == INT64 and not is_int(v):
            raise TraceError(f"float constant {v!r} combined with an int tensor; use ops.to_float first")
        return self.const(np.asarray(v, dtype=NP_OF[like.dtype]))

    def binary(self, op: str, a, b) -> Sym:
        like = a if isinstance(a, Sym) else b
        a, b = self.lift(a, like), self.lift(b, like)
        if a.dtype != b.dtype:
            raise TraceError(f"{op} of {a.dtype} and {b.dtype} tensors; convert explicitly")
        shape = broadcast(a.shape, b.shape)
        if op == "FloorDiv":
            if a.dtype != INT64:
                raise TraceError("// is only defined on int tensors in the graph")
            r = self.node("Mod", [a, b], fmod=0)[0]
            return self.op("Div", [self.node("Sub", [a, r])[0], b], shape, INT64)
        if op == "Mod":
            return self.op("Mod", [a, b], shape, a.dtype, fmod=0 if a.dtype == INT64 else 1)
        return self.op(op, [a, b], shape, BOOL if op in _CMP else a.dtype)

    def getitem(self, x: Sym, key) -> Sym:
        """Basic indexing with ints, Dims, slices (constant or Dim bounds) and `...`."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (x.ndim - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (x.ndim - len(key))
        starts, ends, axes, steps, picks, shape = [], [], [], [], [], []
        for ax, (k, dim) in enumerate(zip(key, x.shape)):
            if isinstance(k, slice):
                if k == slice(None):
                    shape.append(dim)
                    continue
                step = 1 if k.step is None else k.step
                start = 0 if k.start is None else k.start
                stop = dim if k.stop is None else k.stop
                start = dim + start if is_int(start) and start < 0 else start
                stop = dim + stop if is_int(stop) and stop < 0 else stop
                if is_int(start) and is_int(stop) and is_int(dim):
                    start, stop = min(max(start, 0), dim), min(max(stop, 0), dim)
                    n = max(0, -(-(stop - start) // step))
                elif step == 1:
                    n = stop - start
                else:
                    raise TraceError("strided slices need static bounds")
                starts.append(start), ends.append(stop), axes.append(ax), steps.append(step)
                shape.append(n)
            elif is_int(k) or isinstance(k, Dim):
                picks.append((ax, dim + k if is_int(k) and k < 0 else k))
                shape.append(dim)
            else:
                raise TraceError(f"unsupported index {k!r}")
        y = x
        if axes:
            y = self.op("Slice", [x, self.vec(starts), self.vec(ends), self.vec(axes), self.vec(steps)],
                        shape, x.dtype)
        for ax, k in reversed(picks):
            y = self.op("Gather", [y, self.scalar(k)], y.shape[:ax] + y.shape[ax + 1:], x.dtype, axis=ax)
        return y

    def proto(self):
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)

    def model(self, opset: int):
        return helper.make_model(self.proto(), opset_imports=[helper.make_opsetid("", opset)], ir_version=10,
                                 producer_name="dsv4")

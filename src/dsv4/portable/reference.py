"""The NumPy reference backend: the oracle every other backend is measured against.

Three numerics:
* `float64` — the oracle.  Every op in double precision; used by the parity tests.
* `float32` — the same graph in single precision (what fp32 backends are compared with).
* `bfloat16` — float32 compute with values rounded to bf16 at exactly the points where the official code
  stores activations in bf16 (`Ops.act`), so a bf16 backend can be compared with a reference that has
  the same rounding points.
`emulate=True` adds the official quantization-aware numerics of model spec §9.3 (activation FP8 before
every FP8/FP4-weight GEMM, FP8 rounding of KV entries, Hadamard + FP4 on the indexer).

Weights stay quantized (memory-mapped FP8/FP4 bytes + scales) and are dequantized at the matmul that uses
them; small plain tensors (norms, hc, gates, embeddings) are decoded once and cached.  Because the oracle
mostly runs tiny checkpoints one token at a time, dequantized copies are kept up to `dense_cache_bytes`
(default 1 GiB): beyond that budget every use dequantizes afresh, so a large model never turns dense.
The MoE runs only the experts that some token was routed to (the reference is eager, so it may branch on
values; traced backends use the dense default of `Ops.moe` or a grouped kernel).
"""

from __future__ import annotations

import numpy as np

from . import quant
from .ops import Ops
from .runtime import GraphRunner, register_backend
from .weights import WeightStore

_DTYPES = {"float64": np.float64, "float32": np.float32, "bfloat16": np.float32}


class NumpyOps(Ops):
    name = "reference"

    def __init__(self, dtype: str = "float64", emulate: bool = False, dense_cache_bytes: int = 1 << 30):
        if dtype not in _DTYPES:
            raise ValueError(f"reference backend dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.dt = _DTYPES[dtype]
        self.emulate = emulate
        self._dense: dict = {}
        self._dense_left = dense_cache_bytes

    # dtype points
    def act(self, x):
        return quant.round_bf16(x) if self.dtype == "bfloat16" else x

    # primitives
    def asarray(self, x, kind="float"):
        return np.asarray(x, dtype={"float": self.dt, "int": np.int64, "bool": bool}[kind])

    def to_numpy(self, x):
        return np.asarray(x)

    def zeros(self, shape, kind="float"):
        return np.zeros(shape, dtype=self.dt if kind == "float" else np.int64)

    def full(self, shape, value, kind="float"):
        return np.full(shape, value, dtype=self.dt if kind == "float" else np.int64)

    def arange(self, n):
        return np.arange(n, dtype=np.int64)

    def to_float(self, x):
        return x.astype(self.dt)

    def matmul(self, a, b):
        return np.matmul(a, b)

    exp, log, sqrt, abs, cos, sin = (staticmethod(f) for f in (np.exp, np.log, np.sqrt, np.abs, np.cos, np.sin))
    maximum, minimum = staticmethod(np.maximum), staticmethod(np.minimum)

    def where(self, cond, a, b):
        out = np.where(cond, a, b)
        return out.astype(self.dt) if out.dtype.kind == "f" and out.dtype != self.dt else out

    def sum(self, x, axis, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def transpose(self, x, axes):
        return np.transpose(x, axes)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def broadcast_to(self, x, shape):
        return np.broadcast_to(x, shape)

    def take(self, x, idx, axis=0):
        return np.take(x, idx, axis=axis)

    def take_along_axis(self, x, idx, axis=-1):
        return np.take_along_axis(x, idx, axis=axis)

    def widen(self, x, idx, size):
        out = np.zeros(x.shape[:-1] + (size,), dtype=x.dtype)
        out[..., idx] = x
        return out

    def gather_rows(self, x, idx):
        return x[np.arange(x.shape[0])[:, None], idx]

    def write_rows(self, buf, idx, rows):
        if buf.dtype == np.uint16 and rows.dtype != np.uint16:
            rows = quant.f32_to_bf16(rows)
        buf[np.arange(buf.shape[0])[:, None], idx] = rows
        return buf

    def copy(self, x):
        return np.array(x, copy=True)

    def state_buffer(self, shape, kind):
        """bf16 "act" buffers of a bfloat16 run are stored as raw bf16 words (numpy has no bfloat16)."""
        dt = {"int": np.int64, "u8": np.uint8, "hp": self.dt,
              "act": np.uint16 if self.dtype == "bfloat16" else self.dt}[kind]
        return np.zeros(shape, dtype=dt)

    def read(self, buf):
        return quant.bf16_to_f32(buf) if buf.dtype == np.uint16 else buf

    def trim(self, buf, count):
        """Eager: only the rows some query can see (the reference may branch on values)."""
        return buf[:, :int(np.max(count, initial=0))]

    def topk(self, x, k):
        """Partial selection: the k-th largest value bounds the picks (O(n)); the k picks are then ordered
        by (value descending, index ascending), so ties go to the lower index as a stable sort would.
        A NaN ranks below everything (broken weights: the step goes on to NaN logits, which `Model` names,
        instead of failing here on a selection of the wrong size)."""
        x = np.where(np.isnan(x), -np.inf, x)
        n = x.shape[-1]
        if k >= n:
            return np.argsort(-x, axis=-1, kind="stable")[..., :k]
        kth = np.partition(x, n - k, axis=-1)[..., n - k:n - k + 1]
        above = x > kth
        ties = np.cumsum(x == kth, axis=-1) <= k - above.sum(-1, keepdims=True)
        picked = np.nonzero(above | ((x == kth) & ties))[-1].reshape(x.shape[:-1] + (k,))
        vals = np.take_along_axis(x, picked, -1)
        return np.take_along_axis(picked, np.argsort(-vals, axis=-1, kind="stable"), -1)

    # deploy-format state codecs (model spec §5)
    def encode_fp8(self, x, block):
        return quant.encode_fp8_blocks(x, block)

    def decode_fp8(self, codes, scales, block):
        return quant.decode_fp8_blocks(codes, scales, block).astype(self.dt)

    def encode_fp4(self, x, block):
        return quant.encode_fp4_blocks(x, block)

    def decode_fp4(self, packed, scales, block):
        return quant.decode_fp4_blocks(packed, scales, block).astype(self.dt)

    def dense(self, w):
        if not isinstance(w, quant.QuantWeight):
            return w
        hit = self._dense.get(id(w))
        if hit is not None:
            return hit[1]
        d = quant.dequantize(w, self.dt)
        if d.nbytes <= self._dense_left:
            self._dense_left -= d.nbytes
            self._dense[id(w)] = (w, d)        # keep w alive so its id stays unique
        return d

    def moe(self, x, idx, wts, experts, limit):
        out = np.zeros(x.shape, dtype=self.dt)
        for e in np.unique(idx[idx >= 0]):             # −1: an expert another rank holds
            rows = np.nonzero((idx == e).any(-1))[0]
            coef = np.where(idx[rows] == e, wts[rows], 0.0).sum(-1)
            out[rows] += self.expert(x[rows], *experts[e], limit, coef=coef)
        return out

    # numerics emulation (§9.3)
    def linear(self, x, w):
        """x [..., K] times the weight [N, K] as W·xᵀ: OpenBLAS then streams W once without packing it, which
        for a few rows (a verify step, a batched decode) is up to ~2× faster than x·Wᵀ and no slower for a
        prefill chunk (benchmarks/speculative.py: the demo's 3-token verify step went from 15.1 to 11.8 ms
        with its 129,280-row head)."""
        if self.emulate and isinstance(w, quant.QuantWeight) and w.fmt != "float":
            x = quant.act_fp8_round(x, 128)
        d = self.dense(w)
        rows = np.reshape(x, (-1, x.shape[-1]))
        return np.matmul(d, rows.T).T.reshape(*x.shape[:-1], d.shape[0])

    def kv_round(self, x, nope):
        if not self.emulate:
            return x
        return np.concatenate([quant.act_fp8_round(x[..., :nope], 64), x[..., nope:]], -1)

    def indexer_round(self, x):
        if not self.emulate:
            return x
        n = x.shape[-1]
        return quant.act_fp4_round(np.matmul(x, quant.hadamard(n).astype(x.dtype)), 32)


class NumpyWeights(WeightStore):
    """The reference's conversions for the schema-driven store: quantized linears stay `QuantWeight`s over
    the memory map (dequantized at the matmul), float tensors are decoded once into the compute dtype, id
    tables are int64."""

    def __init__(self, cfg, ckpt, dtype):
        super().__init__(cfg, ckpt)
        self.dt = dtype

    def linear(self, prefix):
        return self.ckpt.quant_weight(prefix)

    def plain(self, name):
        return self.ckpt.array(name, np.float32).astype(self.dt)

    def table(self, name):
        return self.ids(name)


def make_runner(cfg, ckpt, dtype="float32", emulate=False, state_format="bf16", **_):
    ops = NumpyOps(dtype, emulate)
    return GraphRunner(cfg, ops, NumpyWeights(cfg, ckpt, ops.dt), state_format)


register_backend("reference", make_runner)

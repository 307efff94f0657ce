"""`Ops` on `mlx.core`: the primitives, plus MLX-native versions of the composites that touch weights.

Precision points: `hp(x)` is float32 (model spec §9.1); `act(x)` stores in the activation dtype — float32
for the parity runs, real `mx.bfloat16` arrays for deployment.  Every matmul computes in float32 (bf16
operands are widened, quantized weights are decoded inside the kernel), as the official kernels
accumulate in fp32; MLX promotes bf16 ⊕ f32 to f32 for elementwise math.  So a bfloat16 run rounds at
exactly the reference's bf16 emulation points (`act`) and nowhere else.  Decode reads weights, not
activations, so float32 activations inside a matmul cost no bandwidth that matters.

Integers are int32 (positions, indices): Metal's native index type; `argsort` yields uint32, which is cast
back so that the graph's −1 "skip" marker stays negative.

Weights reach the graph either as plain arrays (norms, hc tables, bf16 projections) or as `QLinear` /
`ExpertBank` (see qlinear.py); only `linear`, `grouped_linear`, `dense` and `moe` look inside those.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dsv4.portable.ops import Ops

from .qlinear import ExpertBank, QLinear

ACT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
SORT_PAIRS = 64          # (token, slot) pairs from which `moe` may group rows by expert (prefill)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class MlxOps(Ops):
    name = "mlx"

    def __init__(self, dtype: str = "float32", sort_experts: bool | None = None):
        """sort_experts: group prefill MoE rows by expert (see `moe`); None = only off the CPU, where
        MLX's kernels exploit the order (its CPU gather does not, so sorting there only adds work)."""
        if dtype not in ACT_DTYPES:
            raise ValueError(f"mlx backend dtype must be one of {', '.join(ACT_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.adt = ACT_DTYPES[dtype]
        self.sort_experts = (not on_cpu()) if sort_experts is None else sort_experts

    # ------------------------------------------------------------------ dtype points
    def hp(self, x):
        return x if x.dtype == mx.float32 else x.astype(mx.float32)

    def act(self, x):
        return x if x.dtype == self.adt else x.astype(self.adt)

    # ------------------------------------------------------------------ primitives
    def asarray(self, x, kind="float"):
        dt = {"float": np.float32, "int": np.int32, "bool": np.bool_}[kind]
        return mx.array(np.asarray(x, dtype=dt))

    def to_numpy(self, x):
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(x)

    def zeros(self, shape, kind="float"):
        return mx.zeros(tuple(shape), dtype=mx.float32 if kind == "float" else mx.int32)

    def full(self, shape, value, kind="float"):
        return mx.full(tuple(shape), value, dtype=mx.float32 if kind == "float" else mx.int32)

    def arange(self, n):
        return mx.arange(n, dtype=mx.int32)

    def to_float(self, x):
        return x.astype(mx.float32)

    def matmul(self, a, b):
        return mx.matmul(self.hp(a), self.hp(b))

    exp, log, sqrt, abs, cos, sin = (staticmethod(f) for f in (mx.exp, mx.log, mx.sqrt, mx.abs, mx.cos, mx.sin))
    maximum, minimum, where = staticmethod(mx.maximum), staticmethod(mx.minimum), staticmethod(mx.where)

    def sigmoid(self, x):
        return mx.sigmoid(x)

    def rsqrt(self, x):
        return mx.rsqrt(x)

    def sum(self, x, axis, keepdims=False):
        return mx.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis, keepdims=False):
        return mx.max(x, axis=axis, keepdims=keepdims)

    def reshape(self, x, shape):
        return mx.reshape(x, tuple(shape))

    def transpose(self, x, axes):
        return mx.transpose(x, tuple(axes))

    def concat(self, xs, axis):
        return mx.concatenate(list(xs), axis=axis)

    def broadcast_to(self, x, shape):
        return mx.broadcast_to(x, tuple(shape))

    def take(self, x, idx, axis=0):
        return mx.take(x, idx, axis=axis)

    def take_along_axis(self, x, idx, axis=-1):
        return mx.take_along_axis(x, idx, axis=axis)

    def gather_rows(self, x, idx):
        b, m = idx.shape
        return mx.take_along_axis(x, mx.reshape(idx, (b, m) + (1,) * (x.ndim - 2)), axis=1)

    def scatter_rows(self, buf, idx, rows):
        b, m = idx.shape
        return mx.put_along_axis(buf, mx.reshape(idx, (b, m) + (1,) * (buf.ndim - 2)), rows.astype(buf.dtype),
                                 axis=1)

    def topk(self, x, k):
        # argsort is stable on MLX (CPU and Metal merge sort), so equal scores keep the lower index first
        return mx.argsort(-x, axis=-1)[..., :k].astype(mx.int32)

    def dense(self, w):
        return w.dense() if isinstance(w, QLinear) else w

    # ------------------------------------------------------------------ weight-touching composites
    def linear(self, x, w):
        if isinstance(w, QLinear):
            return w.apply(self.hp(x))
        return mx.matmul(self.hp(x), w.T)

    def grouped_linear(self, x, w, groups):
        """wo_a per group without dequantizing: the [G·R, K] weight is viewed as G stacked [R, K] matrices
        (quantization runs along K, so the view is exact) and applied as one batched quantized matmul."""
        if not isinstance(w, QLinear):
            return super().grouped_linear(x, w, groups)
        lead, k = list(x.shape[:-2]), x.shape[-1]
        y = w.grouped(groups).apply(mx.reshape(self.hp(x), (-1, groups, 1, k)))   # [N, G, 1, R]
        return mx.reshape(y, lead + [groups, y.shape[-1]])

    def moe(self, x, idx, wts, experts, limit):
        """Routed experts over the stacked bank: x [N,D], idx/wts [N,k] → Σ_k wts·Expert_idx(x) [N,D].

        Decode (fewer than SORT_PAIRS (token, slot) pairs), and every call when `sort_experts` is off: one
        gather matmul per projection, a pair per batch entry.  Prefill with `sort_experts`: the pairs are
        sorted by expert and run through `gather_qmm(sorted_indices=True)`, so the GPU kernels read each
        expert's weights once per chunk for all its rows; the results return to pair order and the k
        slots of a token are summed in slot order, so both paths give the same values.  Traceable.

        The routing weight multiplies the activation before w2, as `Ops.expert` does.  Like every matmul
        here it computes in float32, which also keeps MLX's CPU `gather_mm` (float32-only) usable."""
        if not isinstance(experts, ExpertBank):
            return super().moe(x, idx, wts, experts, limit)
        n, d = x.shape
        k = idx.shape[1]
        if not self.sort_experts or n * k < SORT_PAIRS:
            xe = mx.reshape(self.hp(x), (n, 1, 1, d))
            y = self._swiglu_w2(experts, xe, mx.reshape(self.hp(wts), (n, k, 1, 1)), limit, idx)  # [N,k,1,D]
            return mx.sum(y, axis=(1, 2))
        flat = mx.reshape(idx, (-1,))
        order = mx.argsort(flat)                                              # pair ids grouped by expert
        xs = mx.take(self.hp(x), order // k, axis=0)[:, None]                 # [P,1,D], P = N·k
        ws = mx.take(mx.reshape(self.hp(wts), (-1, 1, 1)), order, axis=0)
        y = self._swiglu_w2(experts, xs, ws, limit, mx.take(flat, order), sorted_indices=True)   # [P,1,D]
        back = mx.take(y[:, 0], mx.argsort(order), axis=0)                    # pair order again
        return mx.sum(mx.reshape(back, (n, k, d)), axis=1)

    def _swiglu_w2(self, experts, x, coef, limit, rhs_indices, sorted_indices=False):
        """w2(clamped SwiGLU(x)·coef) with each row's expert gathered by `rhs_indices`."""
        g = mx.minimum(self.hp(experts.w1.apply(x, rhs_indices, sorted_indices)), limit)
        u = mx.clip(self.hp(experts.w3.apply(x, rhs_indices, sorted_indices)), -limit, limit)
        a = self.hp(self.act(g * mx.sigmoid(g) * u * coef))
        return self.hp(experts.w2.apply(a, rhs_indices, sorted_indices))

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

from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from dsv4.portable import quant
from dsv4.portable.ops import Ops

from .qlinear import ExpertBank, QLinear

ACT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
SORT_PAIRS = 64          # (token, slot) pairs from which `moe` may group rows by expert (prefill)
DENSE_ROWS = 32          # rows from which a CPU prefill multiplies with the run's dense weight copy


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class MlxOps(Ops):
    name = "mlx"

    def __init__(self, dtype: str = "float32", sort_experts: bool = True):
        """sort_experts: group prefill MoE rows by expert (see `moe`)."""
        if dtype not in ACT_DTYPES:
            raise ValueError(f"mlx backend dtype must be one of {', '.join(ACT_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.adt = ACT_DTYPES[dtype]
        self.sort_experts = sort_experts
        self._run: dict | None = None  # dense float32 weights of the current CPU prefill (see `dense_run`)
        self.tracing = False          # set by the runner while it traces a compiled step (see `trim`)
        self._reads = None            # the latest attention output (see `write_rows`)
        self._hadamard: dict = {}
        self._e8m0 = mx.array(quant.e8m0_to_f32(np.arange(256)))
        self._e2m1 = mx.array(quant.E2M1)

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

    def widen(self, x, idx, size):
        out = mx.zeros(x.shape[:-1] + (size,), dtype=x.dtype)
        out[..., idx] = x
        return out

    def gather_rows(self, x, idx):
        b, m = idx.shape
        return mx.take_along_axis(x, mx.reshape(idx, (b, m) + (1,) * (x.ndim - 2)), axis=1)

    # ------------------------------------------------------------------ state primitives
    def write_rows(self, buf, idx, rows):
        """buf with rows [B,M,...] at rows idx [B,M] (a functional scatter, `put_along_axis`).

        In place where MLX allows: MLX's scatter reuses (donates) its input's memory when, at evaluation,
        nothing else holds that array.  The runner keeps no reference to an old state buffer, and the rows
        are made to depend on the layer's attention output (`sink_attention` runs after every read of the
        layer's old state), so each write is evaluated after the reads of the buffer it overwrites, and the
        buffer is then donated.  Where a buffer is still shared (a fork that has not been written yet, a
        caller holding it) the scatter writes into a fresh copy instead: copy-on-write."""
        b, m = idx.shape
        rows = rows.astype(buf.dtype)
        if self._reads is not None:
            rows = mx.depends(rows, self._reads)
        return mx.put_along_axis(buf, mx.reshape(idx, (b, m) + (1,) * (buf.ndim - 2)), rows, axis=1)

    def copy(self, x):
        """MLX arrays are immutable values, so a fork shares them: the first `write_rows` to a shared buffer
        cannot donate it and writes into a fresh copy (copy-on-write, at most one copy per buffer)."""
        return x

    def state_buffer(self, shape, kind):
        dt = {"act": self.adt, "hp": mx.float32, "int": mx.int32, "u8": mx.uint8}[kind]
        return mx.zeros(tuple(shape), dtype=dt)

    def trim(self, buf, count):
        """Eager: rows 0..max(count)−1 (a host read of `count`).  While the runner traces a compiled step
        (`tracing`), the whole buffer: shapes must not depend on values there (the graph masks the rest)."""
        if self.tracing:
            return buf
        return buf[:, :int(mx.max(count).item())]

    def topk(self, x, k):
        """Indices of the k largest along the last axis, largest first, ties → lower index, by partial
        selection (mx.topk / argpartition do not break ties by index): the k-th largest value `kth` bounds
        the picks — every value > kth, then the lowest-index values == kth up to k — which are gathered in
        index order and then ordered by value with a stable sort of only k items."""
        n = x.shape[-1]
        if k >= n:
            return mx.argsort(-x, axis=-1).astype(mx.int32)          # MLX's argsort is stable
        kth = mx.partition(x, n - k, axis=-1)[..., n - k:n - k + 1]
        above = x > kth
        tie = x == kth
        room = k - mx.sum(above, axis=-1, keepdims=True)
        picked = above | (tie & (mx.cumsum(tie.astype(mx.int32), axis=-1) <= room))
        slot = mx.where(picked, mx.cumsum(picked.astype(mx.int32), axis=-1) - 1, k)   # k: spill column
        cols = mx.broadcast_to(mx.arange(n, dtype=mx.int32), x.shape)
        sel = mx.put_along_axis(mx.zeros(x.shape[:-1] + (k + 1,), mx.int32), slot, cols, axis=-1)[..., :k]
        order = mx.argsort(-mx.take_along_axis(x, sel, axis=-1), axis=-1)
        return mx.take_along_axis(sel, order, axis=-1)

    # ------------------------------------------------------------------ deploy-format codecs (model spec §5)
    def _block_scales(self, x, block, fmax, floor):
        """x as float32 blocks [..., n/block, block], their power-of-two scales 2^⌈log2(max(amax, floor)/fmax)⌉
        [..., n/block, 1] and the scales' E8M0 bytes [..., n/block], with `quant`'s float32 arithmetic;
        the ceil-log2 is read off the float32 bits (exact, like the reference's frexp)."""
        xb = mx.reshape(self.hp(x), tuple(x.shape[:-1]) + (x.shape[-1] // block, block))
        r = mx.maximum(mx.max(mx.abs(xb), axis=-1, keepdims=True), floor) * (1.0 / fmax)
        bits = r.view(mx.uint32)
        e8 = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(mx.uint32)          # biased exponent, rounded up
        return xb, (e8 << 23).view(mx.float32), e8[..., 0].astype(mx.uint8)

    def _scaled(self, values, scales, block):
        vb = mx.reshape(values, tuple(values.shape[:-1]) + (values.shape[-1] // block, block))
        return mx.reshape(vb * mx.take(self._e8m0, scales)[..., None], values.shape)

    def encode_fp8(self, x, block):
        xb, s, e8 = self._block_scales(x, block, quant.E4M3_MAX, 1e-4)
        y = mx.clip(xb / s, -quant.E4M3_MAX, quant.E4M3_MAX)
        return mx.reshape(mx.to_fp8(y), x.shape), e8          # mx.to_fp8: RNE, saturating (bit-exact to quant)

    def decode_fp8(self, codes, scales, block):
        return self._scaled(mx.from_fp8(codes, dtype=mx.float32), scales, block)

    def encode_fp4(self, x, block):
        xb, s, e8 = self._block_scales(x, block, quant.E2M1_MAX, quant.E2M1_MAX * 2.0 ** -126)
        y = mx.clip(xb / s, -quant.E2M1_MAX, quant.E2M1_MAX)
        a = mx.abs(y)
        # e2m1 code of |y| rounded to nearest, ties to the even code: > at even-code ties, ≥ at odd ones
        code = sum(((a > t) if up else (a >= t)).astype(mx.uint8)
                   for t, up in ((0.25, 1), (0.75, 0), (1.25, 1), (1.75, 0), (2.5, 1), (3.5, 0), (5.0, 1)))
        nib = mx.reshape(code | ((y.view(mx.uint32) >> 31).astype(mx.uint8) << 3), x.shape)
        pairs = mx.reshape(nib, tuple(x.shape[:-1]) + (x.shape[-1] // 2, 2))
        return pairs[..., 0] | (pairs[..., 1] << 4), e8

    def decode_fp4(self, packed, scales, block):
        nib = mx.reshape(mx.stack([packed & 0xF, packed >> 4], axis=-1),
                         tuple(packed.shape[:-1]) + (2 * packed.shape[-1],))
        return self._scaled(mx.take(self._e2m1, nib), scales, block)

    def hadamard(self, n):
        if n not in self._hadamard:
            self._hadamard[n] = super().hadamard(n)
        return self._hadamard[n]

    # ------------------------------------------------------------------ attention: the last read of a layer
    def sink_attention(self, q, segments, sink, scale):
        """The default decomposition; its output is also what the layer's state writes wait for (see
        `write_rows`), since every read of the layer's old state feeds it."""
        out = super().sink_attention(q, segments, sink, scale)
        self._reads = out
        return out

    def dense(self, w):
        if not isinstance(w, QLinear):
            return w
        if self._run is None:
            return w.dense()
        if id(w) not in self._run:
            d = w.dense()
            mx.eval(d)
            self._run[id(w)] = (w, d)             # w kept alive so its id stays unique for the run
        return self._run[id(w)][1]

    @contextmanager
    def dense_run(self):
        """A prefill on MLX's CPU backend: each 2-D quantized weight multiplied with ≥ DENSE_ROWS rows is
        decoded once into float32 and kept until the run ends, and multiplied with the BLAS matmul — MLX's
        CPU quantized matmul of many rows is slower than that, and decoding per chunk would repeat the work
        for every chunk.  Routed experts stay quantized (a dense copy of every bank is 8× its FP4 bytes;
        see `moe`).  Elsewhere a no-op: the quantized kernels read each weight once per chunk."""
        if not on_cpu():
            yield
            return
        self._run = {}
        try:
            yield
        finally:
            self._run = None

    def _dense_rows(self, x, w) -> bool:
        return self._run is not None and isinstance(w, QLinear) and x.size // x.shape[-1] >= DENSE_ROWS

    # ------------------------------------------------------------------ weight-touching composites
    def linear(self, x, w):
        if self._dense_rows(x, w):
            return mx.matmul(self.hp(x), self.dense(w).T)
        if isinstance(w, QLinear):
            return w.apply(self.hp(x))
        return mx.matmul(self.hp(x), w.T)

    def grouped_linear(self, x, w, groups):
        """wo_a per group without dequantizing: the [G·R, K] weight is viewed as G stacked [R, K] matrices
        (quantization runs along K, so the view is exact) and applied as one batched quantized matmul."""
        if not isinstance(w, QLinear) or self._dense_rows(x, w):
            return super().grouped_linear(x, w, groups)
        lead, k = list(x.shape[:-2]), x.shape[-1]
        y = w.grouped(groups).apply(mx.reshape(self.hp(x), (-1, groups, 1, k)))   # [N, G, 1, R]
        return mx.reshape(y, lead + [groups, y.shape[-1]])

    def moe(self, x, idx, wts, experts, limit):
        """Routed experts over the stacked bank: x [N,D], idx/wts [N,k] → Σ_k wts·Expert_idx(x) [N,D].

        Decode (fewer than SORT_PAIRS (token, slot) pairs), and every call when `sort_experts` is off: one
        gather matmul per projection, a pair per batch entry.  Prefill with `sort_experts` (on every
        device): the pairs are sorted by expert and run through `gather_qmm(sorted_indices=True)`, so the
        GPU kernels read each expert's weights once per chunk for all its rows (on MLX's CPU it runs as fast
        as the per-pair gather — 41 vs 41 ms for 512 tokens × top-2 of 8 tiny experts — and beats one
        dense BLAS matmul per expert, 68 ms); the results return to pair order and the k slots of a token
        are summed in slot order, so both paths give the same values.  Traceable.

        The routing weight multiplies the activation before w2, as `Ops.expert` does.  Like every matmul
        here it computes in float32, which also keeps MLX's CPU `gather_mm` (float32-only) usable."""
        if not isinstance(experts, ExpertBank):
            return super().moe(x, idx, wts, experts, limit)
        if self.world > 1:               # another rank's expert (−1): slot 0 with a zero weight
            skip = idx < 0
            idx, wts = mx.where(skip, 0, idx), mx.where(skip, 0.0, wts)
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

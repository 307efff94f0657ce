"""`TorchOps`: the op interface on torch, on a CUDA device or (for tests and machines without a GPU) the CPU.

Two paths per composite:
* the op path — the default decompositions of `portable.ops` run on torch primitives (plus a
  dequantize-then-matmul `linear`).  It is the CPU path and the reference of every kernel;
* the kernel path — Triton kernels for the hot composites (sink attention, indexer top-k, mHC collapse
  and expand, grouped MoE experts, FP8 block-scaled linear), taken on a CUDA device in float32/bfloat16
  runs, or anywhere when forced with `kernels=True` (on the CPU that needs `TRITON_INTERPRET=1`).

Numerics mirror the NumPy reference: `float64` (oracle-grade), `float32`, and `bfloat16` = float32
compute with values rounded to bf16 at the `act` points.  `emulate=True` adds the official QAT numerics.

State buffers (`state_buffer`) are stored in the cache schema's storage dtypes: in `bfloat16` mode the "act"
buffers (window, bf16-format entries and indexer keys, the deploy format's rope dims) are real
torch.bfloat16 — lossless, since every value written there is already bf16-rounded — the "hp" compressor
rows stay in the compute dtype and the deploy format's codes and scales are uint8.  `write_rows` updates a
buffer in place (so a CUDA graph can own the state's buffers, see `runner.py`); `read` upcasts bf16 buffers
to the compute dtype; `trim` cuts entry buffers to the visible rows on the eager path only, because a
captured graph must keep its shapes (`static_shapes`).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from ...portable import quant
from ...portable.ops import Ops
from . import numerics
from .weights import ExpertBank, TorchQuant, dequantize

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernels_available(device: torch.device) -> bool:
    """Triton kernels can run: on a CUDA device, or on the CPU under the Triton interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class TorchOps(Ops):
    name = "cuda"

    def __init__(self, dtype: str = "float32", emulate: bool = False, device=None, kernels=None):
        if dtype not in _DTYPES:
            raise ValueError(f"cuda backend dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.dtype, self.dt, self.emulate = dtype, _DTYPES[dtype], emulate
        self.device = torch.device(device) if device is not None else default_device()
        if kernels is None:     # auto: kernels compute in float32, so the float64 oracle path never uses them
            kernels = self.device.type == "cuda" and self.dt == torch.float32 and kernels_available(self.device)
        elif kernels and not kernels_available(self.device):
            raise RuntimeError("Triton kernels need a CUDA device or TRITON_INTERPRET=1 (and triton installed)")
        self.kernels = bool(kernels)
        self.bf16_dot = dtype == "bfloat16"      # bf16 tensor-core operands: exact for bf16-rounded values
        self._consts: dict = {}
        self._static = False          # set while a CUDA graph is warmed up or captured (`static_shapes`)
        if self.kernels:
            from . import kernels as k
            self.k = k

    # ------------------------------------------------------------------ dtype points
    def act(self, x):
        return x.to(torch.bfloat16).to(self.dt) if self.dtype == "bfloat16" else x

    def hp(self, x):
        """Compute precision: upcasts bf16-stored state (exact); everything else passes through."""
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != self.dt:
            return x.to(self.dt)
        return x

    def state_dtype(self, kind: str) -> torch.dtype:
        """Storage dtype of a cache buffer of `kind` ("act" | "hp" | "int" | "u8", see `portable.cache`)."""
        if kind == "int":
            return torch.int64
        if kind == "u8":
            return torch.uint8
        return torch.bfloat16 if kind == "act" and self.dtype == "bfloat16" else self.dt

    @contextlib.contextmanager
    def static_shapes(self):
        """Shapes that do not depend on values (`trim` keeps whole buffers): a CUDA graph's warm-up runs and
        its capture both run under this, so they launch the same kernels with the same sizes."""
        before, self._static = self._static, True
        try:
            yield
        finally:
            self._static = before

    def _const(self, key, make):
        """A device constant made once (never uploaded inside a CUDA-graph capture)."""
        if key not in self._consts:
            self._consts[key] = make()
        return self._consts[key]

    # ------------------------------------------------------------------ primitives
    def asarray(self, x, kind="float"):
        dt = {"float": self.dt, "int": torch.int64, "bool": torch.bool}[kind]
        if isinstance(x, torch.Tensor):
            return x.to(device=self.device, dtype=dt)
        if isinstance(x, (list, tuple)):        # graph constants (rope frequencies): one upload, then cached,
            return self._const((tuple(x), kind),  # so no host→device copy happens inside a CUDA-graph capture
                               lambda: torch.as_tensor(np.asarray(x), dtype=dt, device=self.device))
        return torch.as_tensor(np.asarray(x), dtype=dt, device=self.device)

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def zeros(self, shape, kind="float"):
        return torch.zeros(tuple(shape), dtype=self.dt if kind == "float" else torch.int64, device=self.device)

    def full(self, shape, value, kind="float"):
        return torch.full(tuple(shape), value, dtype=self.dt if kind == "float" else torch.int64,
                          device=self.device)

    def arange(self, n):
        return torch.arange(n, dtype=torch.int64, device=self.device)

    def to_float(self, x):
        return x.to(self.dt)

    def matmul(self, a, b):
        return torch.matmul(a, b)

    exp, log, sqrt, abs, cos, sin = (staticmethod(f) for f in
                                     (torch.exp, torch.log, torch.sqrt, torch.abs, torch.cos, torch.sin))

    def maximum(self, a, b):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, min=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)

    def minimum(self, a, b):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, max=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def sum(self, x, axis, keepdims=False):
        return torch.sum(x, dim=axis, keepdim=keepdims)

    def max(self, x, axis, keepdims=False):
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def reshape(self, x, shape):
        return x.reshape(list(shape))

    def transpose(self, x, axes):
        return x.permute(*axes)

    def concat(self, xs, axis):
        return torch.cat(list(xs), dim=axis)

    def broadcast_to(self, x, shape):
        return torch.broadcast_to(x, tuple(shape))

    def take(self, x, idx, axis=0):
        return torch.movedim(torch.movedim(x, axis, 0)[idx], list(range(idx.dim())),
                             list(range(axis, axis + idx.dim())))

    def take_along_axis(self, x, idx, axis=-1):
        return torch.take_along_dim(x, idx, dim=axis)

    def widen(self, x, idx, size):
        return x.new_zeros(x.shape[:-1] + (size,)).index_copy_(-1, idx, x)

    def gather_rows(self, x, idx):
        return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]

    def write_rows(self, buf, idx, rows):
        """buf[b, idx[b,m]] = rows[b,m], in place (duplicate indices only ever hit the spill row).  While
        autograd records rows that need a gradient (training, `tools/train_demo.py`), the update is out of
        place instead: backward needs the buffer as it was read before the write."""
        at = (torch.arange(buf.shape[0], device=buf.device)[:, None], idx)
        if rows.requires_grad and torch.is_grad_enabled():
            return buf.index_put(at, rows.to(buf.dtype))
        buf[at] = rows.to(buf.dtype)
        return buf

    def copy(self, x):
        return x.clone()

    def state_buffer(self, shape, kind):
        return torch.zeros(tuple(shape), dtype=self.state_dtype(kind), device=self.device)

    def read(self, buf):
        """bf16-stored values in the compute dtype (exact); every other buffer is read as stored."""
        return buf.to(self.dt) if buf.dtype == torch.bfloat16 and self.dt != torch.bfloat16 else buf

    def trim(self, buf, count):
        """Rows 0..max(count)−1 on the eager path (one host sync); the whole buffer under `static_shapes` or
        while a CUDA graph is being captured, where shapes may not follow values."""
        if self._static or (buf.is_cuda and torch.cuda.is_current_stream_capturing()):
            return buf
        return buf[:, :int(count.max()) if count.numel() else 0]

    def topk(self, x, k):
        """Partial selection with the tie rule of a stable sort (model spec §11.1b), without a host sync:
        the k-th largest value (`torch.topk` values are exact, its order on ties is not) bounds the picks;
        all values above it and the lowest-index ones equal to it are compacted in index order with a
        cumulative count, then the k picks are ordered by value with a stable sort (ties → lower index)."""
        n = x.shape[-1]
        if k >= n:
            return torch.sort(x, dim=-1, descending=True, stable=True)[1][..., :k]
        kth = torch.topk(x, k, dim=-1).values[..., -1:]
        above, tie = x > kth, x == kth
        need = k - above.sum(-1, keepdim=True)
        pick = above | (tie & (torch.cumsum(tie.to(torch.int64), -1) <= need))
        slot = torch.where(pick, torch.cumsum(pick.to(torch.int64), -1) - 1, k)     # k = a spill column
        j = torch.arange(n, device=x.device).expand(x.shape)
        picked = torch.zeros(x.shape[:-1] + (k + 1,), dtype=torch.int64, device=x.device)
        picked = picked.scatter_(-1, slot, j)[..., :k]
        order = torch.sort(torch.gather(x, -1, picked), dim=-1, descending=True, stable=True)[1]
        return torch.gather(picked, -1, order)

    # ------------------------------------------------------------------ deploy-format state codecs (§5)
    def encode_fp8(self, x, block):
        return numerics.encode_fp8(x, block)

    def decode_fp8(self, codes, scales, block):
        return numerics.decode_blocks(numerics.e4m3_values(codes), self._e8m0(scales), block).to(self.dt)

    def encode_fp4(self, x, block):
        return numerics.encode_fp4(x, block, self._const(("e2m1", x.device), lambda: numerics.e2m1_grid(x.device)))

    def decode_fp4(self, packed, scales, block):
        table = self._const(("e2m1 values", packed.device), lambda: numerics.e2m1_values(packed.device))
        return numerics.decode_blocks(numerics.unpack_fp4(packed, table), self._e8m0(scales), block).to(self.dt)

    def _e8m0(self, scales):
        table = self._const(("e8m0", scales.device), lambda: torch.as_tensor(numerics.E8M0_TABLE, device=scales.device))
        return table[scales.long()]

    def hadamard(self, n):
        """H_n/√n in the compute dtype, cached on the device (no upload inside a graph capture)."""
        return self._const(("hadamard", n), lambda: torch.as_tensor(quant.hadamard(n, np.float64), dtype=self.dt,
                                                                     device=self.device))

    def dense(self, w):
        return dequantize(w, self.dt) if isinstance(w, TorchQuant) else w

    # ------------------------------------------------------------------ quantized linear and emulation
    def linear(self, x, w):
        if isinstance(w, TorchQuant):
            if self.emulate:
                x = numerics.act_fp8_round(x, 128)
            if self.kernels and w.fmt == "fp8" and x.dtype == torch.float32:
                return self.k.fp8_linear(x, w, self.bf16_dot)
            return torch.matmul(x, dequantize(w, self.dt).T)
        return torch.matmul(x, w.T)

    def kv_round(self, x, nope):
        if not self.emulate:
            return x
        return torch.cat([numerics.act_fp8_round(x[..., :nope], 64), x[..., nope:]], -1)

    def indexer_round(self, x):
        if not self.emulate:
            return x
        h = self.hadamard(x.shape[-1]).to(x.dtype)
        return numerics.act_fp4_round(torch.matmul(x, h), 32)

    # ------------------------------------------------------------------ kernel dispatch of the composites
    def hc_pre(self, h, fn, base, scale, iters, hc_eps, norm_eps):
        if not self.kernels:
            return super().hc_pre(h, fn, base, scale, iters, hc_eps, norm_eps)
        x, post, comb = self.k.hc_pre(h, fn, base, scale, iters, hc_eps, norm_eps)
        return self.act(x), post, comb

    def hc_post(self, f, res, post, comb):
        if not self.kernels:
            return super().hc_post(f, res, post, comb)
        return self.act(self.k.hc_post(f, res, post, comb))

    def sink_attention(self, q, segments, sink, scale):
        if not self.kernels:
            return super().sink_attention(q, segments, sink, scale)
        return self.act(self.k.sink_attention(q, segments, sink, scale, self.bf16_dot))

    def indexer_topk(self, qi, w, segments, k):
        if not self.kernels or self.world > 1:        # the kernel selects before ranks could sum their heads
            return super().indexer_topk(qi, w, segments, k)
        if not self.kernels:
            return super().indexer_topk(qi, w, segments, k)
        return self.k.indexer_topk(qi, w, segments, k)   # fp32 dots: qi is not bf16-rounded

    def moe(self, x, idx, wts, experts, limit):
        if self.kernels and isinstance(experts, ExpertBank):
            skip = idx < 0               # another rank's expert: routed to slot 0 with a zero weight
            return self._moe_kernel(x, torch.where(skip, 0, idx), torch.where(skip, 0.0, wts), experts, limit)
        if self.device.type != "cpu":
            return super().moe(x, idx, wts, experts, limit)
        # CPU: run only the routed experts, on only their tokens.  Same sum as the dense decomposition (an
        # unrouted expert contributes an exact zero), in the same ascending expert order; a host-side loop
        # is fine here because the CPU path is never captured into a graph.
        out = torch.zeros(x.shape, dtype=self.dt, device=x.device)
        for e in torch.unique(idx[idx >= 0]).tolist():       # −1: an expert another rank holds
            hit = (idx == e)
            rows = torch.nonzero(hit.any(-1)).flatten()
            coef = torch.sum(torch.where(hit[rows], wts[rows], 0.0), -1)
            out[rows] += self.expert(x[rows], *experts[e], limit, coef=coef)
        return out

    def _moe_kernel(self, x, idx, wts, experts, limit):
        def between(a):           # what the decomposition does to the SwiGLU output before w2
            a = self.act(a)
            return numerics.act_fp8_round(a, 128) if self.emulate else a
        xa = numerics.act_fp8_round(x, 128) if self.emulate else x
        return self.k.moe(xa, idx, wts, experts, limit, between, self.bf16_dot)

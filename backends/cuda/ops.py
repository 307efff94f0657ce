"""`TorchOps`: the op interface on torch, on a CUDA device or (for tests and machines without a GPU) the CPU.

Two paths per composite:
* the op path — the default decompositions of `portable.ops` run on torch primitives (plus a
  dequantize-then-matmul `linear`).  It is the CPU path and the reference of every kernel;
* the kernel path — Triton kernels for the hot composites (sink attention, indexer top-k, mHC collapse
  and expand, grouped MoE experts, FP8 block-scaled linear), taken on a CUDA device in float32/bfloat16
  runs, or anywhere when forced with `kernels=True` (on the CPU that needs `TRITON_INTERPRET=1`).

Numerics mirror the NumPy reference: `float64` (oracle-grade), `float32`, and `bfloat16` = float32
compute with values rounded to bf16 at the `act` points.  `emulate=True` adds the official QAT numerics.

Decode state in `bfloat16` mode stores the cache schema's "act" buffers (window, compressed entries,
indexer keys) as real torch.bfloat16 — lossless, since every value written there is already bf16-rounded —
and the "hp" compressor rows in float32 (`state_dtype`).  Reads need no explicit casts: `torch.cat`
promotes the bf16 window/entries to float32, `scatter_rows` keeps the buffer's dtype, and `hp` upcasts
(the indexer keys on the op path).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ...portable.ops import Ops
from ...portable import quant
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
        """Storage dtype of a cache buffer of `kind` ("act" | "hp" | "int", see `portable.cache`)."""
        if kind == "int":
            return torch.int64
        return torch.bfloat16 if kind == "act" and self.dtype == "bfloat16" else self.dt

    # ------------------------------------------------------------------ primitives
    def asarray(self, x, kind="float"):
        dt = {"float": self.dt, "int": torch.int64, "bool": torch.bool}[kind]
        if isinstance(x, torch.Tensor):
            return x.to(device=self.device, dtype=dt)
        if isinstance(x, (list, tuple)):        # graph constants (rope frequencies): one upload, then cached,
            key = (tuple(x), kind)             # so no host→device copy happens inside a CUDA-graph capture
            if key not in self._consts:
                self._consts[key] = torch.as_tensor(np.asarray(x), dtype=dt, device=self.device)
            return self._consts[key]
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

    def gather_rows(self, x, idx):
        return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]

    def scatter_rows(self, buf, idx, rows):
        out = buf.clone()
        out[torch.arange(buf.shape[0], device=buf.device)[:, None], idx] = rows.to(buf.dtype)
        return out

    def topk(self, x, k):
        """Stable descending sort, so equal scores keep the lower index first (model spec §11.1b)."""
        return torch.sort(x, dim=-1, descending=True, stable=True)[1][..., :k]

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
        key = ("hadamard", x.shape[-1], x.dtype)      # cached: no host→device copy inside a graph capture
        if key not in self._consts:
            self._consts[key] = torch.as_tensor(quant.hadamard(x.shape[-1], np.float64), dtype=x.dtype,
                                                device=x.device)
        h = self._consts[key]
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

    def sink_attention(self, q, kv, idx, sink, scale):
        if not self.kernels:
            return super().sink_attention(q, kv, idx, sink, scale)
        return self.act(self.k.sink_attention(q, kv, idx, sink, scale, self.bf16_dot))

    def indexer_topk(self, qi, w, keys, visible, k):
        if not self.kernels:
            return super().indexer_topk(qi, w, keys, visible, k)
        return self.k.indexer_topk(qi, w, keys, visible, k)   # fp32 dots: qi is not bf16-rounded

    def moe(self, x, idx, wts, experts, limit):
        if self.kernels and isinstance(experts, ExpertBank):
            return self._moe_kernel(x, idx, wts, experts, limit)
        if self.device.type != "cpu":
            return super().moe(x, idx, wts, experts, limit)
        # CPU: run only the routed experts, on only their tokens.  Same sum as the dense decomposition (an
        # unrouted expert contributes an exact zero), in the same ascending expert order; a host-side loop
        # is fine here because the CPU path is never captured into a graph.
        out = torch.zeros(x.shape, dtype=self.dt, device=x.device)
        for e in torch.unique(idx).tolist():
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

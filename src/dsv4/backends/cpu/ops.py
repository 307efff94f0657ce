"""`CpuOps`: the NumPy float32 op set with V4's weight-bound composites on the stored-format kernels.

What it replaces, and why that suffices: a decode step's time on a CPU is reading the weights, and all of
that happens in `linear`, `grouped_linear` and `moe`; attention, mHC and the indexer read the state and a
few small tensors, which NumPy (its BLAS) already does well.  Everything else is `NumpyOps` float32.

* up to `FUSED_ROWS` activation rows (decode, a speculative verify step, a small batch): one fused
  kernel per product that decodes each weight once and multiplies it into every row (`kernels.linear`);
  the routed experts of those rows run as one kernel over only the selected experts (`kernels.moe`);
* mHC's Sinkhorn normalization (twice per layer per step, ~80 tiny NumPy reductions each) is one call;
* more rows (prefill): each weight is decoded tile by tile (`TILE_BYTES` of float32 rows, cache-sized)
  straight into a BLAS matrix product, never into a whole dense copy, the tiles spread over the threads;
  the routed experts go expert by expert over the rows routed to each (`NumpyOps.moe`), so only those
  experts' weights are read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...portable import quant
from ...portable.reference import NumpyOps
from . import kernels
from .weights import CpuLinear, ExpertBank

FUSED_ROWS = 8
TILE_BYTES = 1 << 20


class CpuOps(NumpyOps):
    name = "cpu"

    def __init__(self, dtype: str = "float32", emulate: bool = False):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"cpu backend dtype must be float32 or bfloat16, got {dtype!r} "
                             "(float64 is the reference backend's)")
        super().__init__(dtype, emulate, dense_cache_bytes=0)
        self.threads = 1            # set once by the runner, before the first step
        self._workers = None

    def dense(self, w):
        return w.dense() if isinstance(w, CpuLinear) else w

    def weight_rows(self, w, idx):
        return w.rows(idx) if isinstance(w, CpuLinear) else super().weight_rows(w, idx)

    def row_absmax(self, w):
        """BF16 words: the largest magnitude is the largest word with the sign cleared (bf16 orders like its
        bits), found without decoding the matrix; other formats a row block at a time."""
        if not isinstance(w, CpuLinear):
            return super().row_absmax(w)
        n, k = w.shape
        if w.fmt == kernels.BF16:
            words = w.codes.reshape(n, k)
            top = np.concatenate([(words[a:a + 4096] & 0x7FFF).max(-1) for a in range(0, n, 4096)])
            return quant.bf16_to_f32(top.astype(np.uint16))
        return np.concatenate([np.abs(w.rows(np.arange(a, min(n, a + 1024)))).max(-1) for a in range(0, n, 1024)])

    def _rows(self, x, w: CpuLinear):
        if self.emulate and w.fmt != kernels.BF16:
            x = quant.act_fp8_round(x, 128)
        return np.ascontiguousarray(np.reshape(x, (-1, x.shape[-1])), dtype=np.float32)

    def _tiled(self, rows, w: CpuLinear, r0: int, r1: int) -> np.ndarray:
        """rows [M, K] · W[r0:r1]ᵀ through decoded float32 tiles of W, the tiles spread over `threads`
        worker threads (each decodes its tile without the GIL, then a single-threaded BLAS product)."""
        k = w.shape[1]
        step = max(quant.FP8_BLOCK, TILE_BYTES // (4 * k) // quant.FP8_BLOCK * quant.FP8_BLOCK)
        out = np.empty((rows.shape[0], r1 - r0), np.float32)
        starts = range(r0, r1, step)

        def product(a):
            t = np.empty((min(step, r1 - a), k), np.float32)
            kernels.decode_tile(w.fmt, w.codes, w.scale, k, a, t)
            np.matmul(rows, t.T, out=out[:, a - r0:a - r0 + t.shape[0]])

        if self.threads > 1 and len(starts) > 1:
            list(self._pool().map(product, starts))
        else:
            for a in starts:
                product(a)
        return out

    def _pool(self) -> ThreadPoolExecutor:
        if self._workers is None:
            self._workers = ThreadPoolExecutor(self.threads, thread_name_prefix="dsv4-cpu")
        return self._workers

    def linear(self, x, w):
        if not isinstance(w, CpuLinear):
            return super().linear(x, w)
        n, k = w.shape
        rows = self._rows(x, w)
        if rows.shape[0] <= FUSED_ROWS:
            out = np.empty((rows.shape[0], n), np.float32)
            kernels.linear(w.fmt, w.codes, w.scale, n, k, rows, n, out)
        else:
            out = self._tiled(rows, w, 0, n)
        return out.reshape(*x.shape[:-1], n)

    def grouped_linear(self, x, w, groups):
        if not isinstance(w, CpuLinear):
            return super().grouped_linear(x, w, groups)
        n, k = w.shape
        per = n // groups
        lead = list(x.shape[:-2])
        rows = self._rows(x, w)                                    # [M·G, K]
        m = rows.shape[0] // groups
        if m <= FUSED_ROWS:
            out = np.empty((m, n), np.float32)
            kernels.linear(w.fmt, w.codes, w.scale, n, k, rows, per, out)
        else:
            by_group = rows.reshape(m, groups, k)
            out = np.concatenate([self._tiled(np.ascontiguousarray(by_group[:, g]), w, g * per, (g + 1) * per)
                                  for g in range(groups)], -1)
        return out.reshape(lead + [groups, per])

    def sinkhorn(self, c, iters, eps):
        flat = np.ascontiguousarray(np.reshape(c, (-1,) + c.shape[-2:]))
        return np.reshape(kernels.sinkhorn(flat, iters, flat.dtype.type(eps)), c.shape)

    def moe(self, x, idx, wts, experts, limit):
        if not isinstance(experts, ExpertBank) or x.shape[0] > FUSED_ROWS or self.emulate:
            return super().moe(x, idx, wts, experts, limit)
        b = experts
        out = np.empty(x.shape, np.float32)
        kernels.moe(b.fmt, b.w1.codes, b.w1.scale, b.w2.codes, b.w2.scale, b.w3.codes, b.w3.scale,
                    b.w1.shape[0], b.w1.shape[1], np.ascontiguousarray(x, dtype=np.float32),
                    np.ascontiguousarray(idx, dtype=np.int64), np.ascontiguousarray(wts, dtype=np.float32),
                    np.float32(limit), self.dtype == "bfloat16", out)
        return out

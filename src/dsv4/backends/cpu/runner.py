"""`CpuRunner`: the eager graph runner on `CpuOps`, with the thread count the user asked for.

Threads: the kernels run on numba's pool and the other products on NumPy's BLAS, one after the other, so
each may use every core without the two oversubscribing them.  `threads` (default: the cores this process
may run on, or OMP_NUM_THREADS when set) bounds both: BLAS through threadpoolctl (process-wide), numba per
calling thread, which is why each step sets it (a server steps from its worker thread).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from ...portable.runtime import GraphRunner
from .ops import CpuOps
from .weights import CpuWeights


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class CpuRunner(GraphRunner):
    def __init__(self, cfg, ops: CpuOps, weights: CpuWeights, state_format: str = "bf16",
                 threads: int | None = None):
        super().__init__(cfg, ops, weights, state_format)
        want = threads or default_threads()
        if want < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = min(want, numba.config.NUMBA_NUM_THREADS)
        self._blas = threadpool_limits(self.threads, user_api="blas")

    def step(self, state, ids: np.ndarray):
        numba.set_num_threads(self.threads)
        return super().step(state, ids)

    def mtp_step(self, state, streams, ids_next, with_streams=False, draft=False):
        numba.set_num_threads(self.threads)
        return super().mtp_step(state, streams, ids_next, with_streams, draft)


def make_runner(cfg, ckpt, dtype="float32", emulate=False, state_format="bf16", threads=None, **_):
    """Runner for `dsv4.load(..., backend="cpu")`: dtype float32 or bfloat16; `threads` as above."""
    ops = CpuOps(dtype, emulate)
    weights = CpuWeights(cfg, ckpt, ops.dt)
    weights.load_all()
    return CpuRunner(cfg, ops, weights, state_format, threads)

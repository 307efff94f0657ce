"""`CpuRunner`: the eager graph runner on `CpuOps`, with the thread count the user asked for.

Threads: the kernels run on numba's pool, `threads` of them (default: the cores this process may run on,
or OMP_NUM_THREADS when set), set per step because numba's count is per calling thread (a server steps
from its worker thread).  NumPy's BLAS runs one thread during a step: its idle threads spin-wait for work
and so do numba's OpenMP ones, and the two pools alternating on the same cores made a medium-model decode
step 5-6x slower (48 ms → 240-300 ms, prefill 63 → 4 tok/s on 2 cores); the BLAS products left in a step
(attention over the state, mHC) are small, and prefill's large ones run as tiles on `threads` worker threads
(`CpuOps._tiled`), each with its own single-threaded BLAS call.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

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
        self.threads = ops.threads = min(want, numba.config.NUMBA_NUM_THREADS)
        self._pools = ThreadpoolController()

    def _threads(self):
        numba.set_num_threads(self.threads)
        return self._pools.limit(limits=1, user_api="blas")

    def step(self, state, ids: np.ndarray):
        with self._threads():
            return super().step(state, ids)

    def mtp_step(self, state, streams, ids_next, with_streams=False, draft=False):
        with self._threads():
            return super().mtp_step(state, streams, ids_next, with_streams, draft)


def make_runner(cfg, ckpt, dtype="float32", emulate=False, state_format="bf16", threads=None, **_):
    """Runner for `dsv4.load(..., backend="cpu")`: dtype float32 or bfloat16; `threads` as above."""
    ops = CpuOps(dtype, emulate)
    weights = CpuWeights(cfg, ckpt, ops.dt)
    weights.load_all()
    return CpuRunner(cfg, ops, weights, state_format, threads)

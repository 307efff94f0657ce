"""The MLX runner: the portable graph on `MlxOps`, compiled short steps per capacity bucket, chunked eager
prefill, states updated in place.

Why this split (gpt-fast's recipe): a decode step's shapes depend only on (batch, capacity) — positions and
counts come from `state["start"]` — so one `mx.compile` trace per capacity bucket is replayed for every
token until the state grows into the next bucket, which removes the Python dispatch of a few thousand small
ops per token (by default on GPU devices only; see `make_runner` for why not on MLX's CPU backend).  The
same holds for the short steps of speculative decoding (a [B, k+1] verify, the MTP block's catch-up):
steps of up to `COMPILED_TOKENS` tokens run compiled, one trace per (bucket, batch, length), replayed
every round.  The compiled function takes the flat state buffers and the ids and returns the logits, the
streams and the new buffers.  Prefill runs the same graph eagerly in chunks of `prefill_chunk` tokens: its
cost is in the big matmuls, eager reads trim the entry buffers to the visible rows, and each distinct
chunk length would otherwise cost a fresh trace.  Each chunk is evaluated before the next one is built, which bounds MLX's
lazy graph and the memory of intermediate activations.

In place: the runner hands the old buffers to the graph and keeps no reference to them, so MLX donates
each buffer to the scatter that writes its new rows (`MlxOps.write_rows`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import mlx.core as mx
import numpy as np

from dsv4.portable import cache, graph
from dsv4.portable.runtime import GraphRunner

from .ops import MlxOps, on_cpu
from .weights import CheckpointWeights, ConvertedWeights, converted_format

COMPILED_TOKENS = 8            # decode, verify (k + 1 ≤ 8: `speculative.MAX_DRAFT`) and MTP catch-up steps


class MlxRunner(GraphRunner):
    def __init__(self, cfg, ops: MlxOps, weights, state_format: str = "bf16", prefill_chunk: int = 512,
                 compile: bool | None = None):
        super().__init__(cfg, ops, weights, state_format)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be ≥ 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.compile = (not on_cpu()) if compile is None else compile
        self._compiled: dict = {}      # (mtp, capacity, draft) → compiled single-token step
        self.traces = 0                # graph traces made for compiled steps (one per bucket and batch size)

    # ------------------------------------------------------------------ one chunk
    def _graph(self, state: cache.State, ids, streams, draft: bool = False):
        o = self.ops
        o._reads = None
        if streams is None:
            return graph.forward(o, self.weights, self.cfg, state, ids, self.live_head)
        return graph.mtp_forward(o, self.weights, self.cfg, state, streams, ids, True, self.live_head, draft)

    def _compiled_step(self, mtp: bool, capacity: int, draft: bool = False):
        """The compiled short step for one capacity bucket (MLX traces it once per input shape) and the
        buffer names it takes, in `state_spec` order: (ids, [streams], *buffers) → (logits, streams,
        *new buffers)."""
        key = (mtp, capacity, draft)
        if key not in self._compiled:
            self.live_head                             # found before tracing (it reads the head back)
            fmt, cfg = self.state_format, self.cfg
            names = [b.name for b in cache.spec_for(cfg, 1, capacity, fmt, mtp)]

            def step(ids, *arrays):
                self.traces += 1
                streams, bufs = (arrays[0], arrays[1:]) if mtp else (None, arrays)
                state = cache.State(cfg, dict(zip(names, bufs)), capacity, fmt, mtp)
                with self._tracing():
                    logits, h = self._graph(state, ids, streams, draft)
                return (logits, h) + tuple(state.buffers[n] for n in names)

            self._compiled[key] = (mx.compile(step), names)
        return self._compiled[key]

    @contextmanager
    def _tracing(self):
        self.ops.tracing = True
        try:
            yield
        finally:
            self.ops.tracing, self.ops._reads = False, None

    def _prefill(self, tokens: int):
        """A multi-token step holds dense weight copies for all its chunks on the CPU (`MlxOps.dense_run`)."""
        return self.ops.dense_run() if tokens > (COMPILED_TOKENS if self.compile else 1) else nullcontext()

    def _chunk(self, state: cache.State, ids: mx.array, streams=None, draft: bool = False):
        """Run one chunk on `state` (updated in place) and evaluate it; returns (logits, streams)."""
        if self.compile and ids.shape[1] <= COMPILED_TOKENS:
            fn, names = self._compiled_step(streams is not None, state.capacity, draft)
            args = [ids] + ([] if streams is None else [streams]) + [state.buffers.pop(n) for n in names]
            out = fn(*args)
            del args                                   # the old buffers live on only in the graph (donated)
            logits, h = out[0], out[1]
            state.buffers.update(zip(names, out[2:]))
        else:
            logits, h = self._graph(state, ids, streams, draft)
            self.ops._reads = None
        mx.eval(logits, h, *state.buffers.values())
        return logits, h

    def settle(self, arrays: list) -> None:
        mx.eval(*arrays)

    # ------------------------------------------------------------------ runner contract
    def step(self, state: cache.State, ids: np.ndarray):
        ids = np.asarray(ids)
        self.reserve(state, ids.shape[1])
        logits, streams = [], []
        with self._prefill(ids.shape[1]):
            for a in range(0, ids.shape[1], self.prefill_chunk):
                lg, h = self._chunk(state, mx.array(ids[:, a:a + self.prefill_chunk].astype(np.int32)))
                logits.append(lg)
                streams.append(h)
        lg = logits[0] if len(logits) == 1 else mx.concatenate(logits, 1)
        h = streams[0] if len(streams) == 1 else mx.concatenate(streams, 1)
        return self.ops.to_numpy(lg), h

    def mtp_step(self, state: cache.State, streams, ids_next: np.ndarray, with_streams: bool = False,
                 draft: bool = False):
        ids = np.asarray(ids_next)
        self.reserve(state, ids.shape[1])
        n, logits, hs = self.prefill_chunk, [], []
        with self._prefill(ids.shape[1]):
            for a in range(0, ids.shape[1], n):
                lg, h = self._chunk(state, mx.array(ids[:, a:a + n].astype(np.int32)), streams[:, a:a + n],
                                    draft)
                logits.append(lg)
                hs.append(h)
        lg = self.ops.to_numpy(logits[0] if len(logits) == 1 else mx.concatenate(logits, 1))
        return (lg, hs[0] if len(hs) == 1 else mx.concatenate(hs, 1)) if with_streams else lg


def make_runner(cfg, ckpt, dtype: str = "float32", emulate: bool = False, state_format: str = "bf16",
                bits: int | None = None, q_mode: str = "mxfp4", compile: bool | None = None,
                prefill_chunk: int = 512) -> MlxRunner:
    """An MLX runner over an official-layout checkpoint (weights mapped to MLX forms as they load; `bits` /
    `q_mode` requantize, see qlinear.py) or over a directory written by `convert` (loaded as is).

    compile=None compiles the decode step on GPU devices only: on MLX's CPU backend a compiled step is
    built by invoking the C++ compiler for every fused kernel (about a minute for the tiny model, cached
    on disk afterwards) and then runs no faster than the eager step (measured 60–130 ms vs 40 ms)."""
    if emulate:
        raise ValueError("the mlx backend runs the deployment numerics only; the quantization-aware "
                         "emulation (emulate=True) is available on the reference backend")
    ops = MlxOps(dtype)
    fmt = converted_format(ckpt.path)
    if fmt is not None:
        if bits is not None:
            raise ValueError(f"{ckpt.path} is already converted ({fmt.get('q_mode')}, {fmt.get('bits')} bits); "
                             "load it without bits=, or convert the original checkpoint again")
        weights = ConvertedWeights(cfg, ckpt, fmt)
    else:
        weights = CheckpointWeights(cfg, ckpt, bits, q_mode)
    weights.load_all()
    return MlxRunner(cfg, ops, weights, state_format, prefill_chunk=prefill_chunk, compile=compile)

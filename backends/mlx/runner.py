"""The MLX runner: the portable graph on `MlxOps`, a compiled single-token step, chunked prefill.

Why this split (gpt-fast's recipe): a decode step has one static shape per batch size — the state buffers
are fixed-capacity and positions come from `state["start"]` — so it is traced once by `mx.compile` and
replayed, which removes the Python dispatch of a few thousand small ops per token (by default on GPU
devices only; see `make_runner` for why not on MLX's CPU backend).  Prefill runs the same
graph eagerly in chunks of `prefill_chunk` tokens: its cost is in the big matmuls, and each distinct chunk
length would otherwise cost a fresh trace.  Each chunk is evaluated before the next one is built, which
bounds the size of MLX's lazy graph and the memory of intermediate activations.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dsv4.portable import graph
from dsv4.portable.runtime import GraphRunner

from .ops import MlxOps, on_cpu
from .weights import CheckpointWeights, ConvertedWeights, converted_format


class MlxRunner(GraphRunner):
    def __init__(self, cfg, ops: MlxOps, weights, prefill_chunk: int = 512, compile: bool | None = None):
        super().__init__(cfg, ops, weights)
        if compile is None:
            compile = not on_cpu()
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be ≥ 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._decode = mx.compile(self._forward) if compile else self._forward
        self._mtp_decode = mx.compile(self._mtp_forward) if compile else self._mtp_forward

    def _forward(self, state, ids):
        return graph.forward(self.ops, self.weights, self.cfg, state, ids)

    def _mtp_forward(self, state, streams, ids_next):
        return graph.mtp_forward(self.ops, self.weights, self.cfg, state, streams, ids_next)

    def step(self, state: dict, ids: np.ndarray):
        ids = np.asarray(ids)
        logits, streams = [], []
        for a in range(0, ids.shape[1], self.prefill_chunk):
            part = mx.array(ids[:, a:a + self.prefill_chunk].astype(np.int32))
            fn = self._decode if part.shape[1] == 1 else self._forward
            lg, state, h = fn(state, part)
            mx.eval(lg, state, h)
            logits.append(lg)
            streams.append(h)
        lg = logits[0] if len(logits) == 1 else mx.concatenate(logits, 1)
        h = streams[0] if len(streams) == 1 else mx.concatenate(streams, 1)
        return self.ops.to_numpy(lg), state, h

    def mtp_step(self, state: dict, streams, ids_next: np.ndarray):
        ids = np.asarray(ids_next)
        n = self.prefill_chunk
        logits = []
        for a in range(0, ids.shape[1], n):
            part = mx.array(ids[:, a:a + n].astype(np.int32))
            fn = self._mtp_decode if part.shape[1] == 1 else self._mtp_forward
            lg, state = fn(state, streams[:, a:a + n], part)
            mx.eval(lg, state)
            logits.append(lg)
        lg = logits[0] if len(logits) == 1 else mx.concatenate(logits, 1)
        return self.ops.to_numpy(lg), state


def make_runner(cfg, ckpt, dtype: str = "float32", emulate: bool = False, bits: int | None = None,
                q_mode: str = "mxfp4", compile: bool | None = None, prefill_chunk: int = 512) -> MlxRunner:
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
        weights = ConvertedWeights(ckpt, fmt)
    else:
        weights = CheckpointWeights(ckpt, bits, q_mode)
    weights.load_all()
    return MlxRunner(cfg, ops, weights, prefill_chunk=prefill_chunk, compile=compile)

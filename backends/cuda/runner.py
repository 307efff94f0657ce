"""`CudaRunner`: the eager graph runner plus chunked prefill and CUDA-graph decode.

Prefill is split into chunks of `prefill_chunk` tokens (the graph's causal rules make chunked prefill
exact), which bounds activation memory for long prompts.

States are values, as everywhere in dsv4 (`portable.generate`'s prefix cache keeps old states and resumes
from them): no step ever changes a state it was given or one it returned earlier.  Each buffer keeps the
dtype it was created with (`new_state`: bf16 "act" buffers in bfloat16 mode, see `ops.py`).

Decode (one token per sequence) on a CUDA device replays a captured CUDA graph: the whole
`graph.forward` — every kernel launch of every layer — becomes one launch, which is what makes small-batch
decode fast.  A graph reads and writes fixed addresses, so it owns private static buffers (`_StaticState`):

* before a replay the input state is copied into them, unless it is the state the previous replay
  returned, whose values they still hold (the normal decode loop: no copy in);
* the captured graph ends by copying the new state into the same buffers (in place);
* the caller gets a clone of the buffers (one device copy per buffer), never the buffers themselves, so a
  returned state is not overwritten by later steps and may be resumed from at any time.

One graph is captured per (batch, state shapes and dtypes), on a side stream after warm-up runs that
materialize everything the forward needs (lazily loaded weights, rope tables, the FP4 decode table,
compiled Triton kernels), so no host transfer or allocation of persistent memory happens inside capture.
Without a CUDA device (or with `cuda_graphs=False`) every step runs eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from ...portable import cache, graph
from ...portable.runtime import GraphRunner
from .ops import TorchOps
from .weights import TorchWeights


def clone_state(state: dict) -> dict:
    """An independent copy (new tensors, same dtypes and device)."""
    return {k: v.clone() for k, v in state.items()}


def _keep_dtypes(new: dict, old: dict) -> dict:
    """The new state in the storage dtypes of the old one (bf16 window rows come out of the graph in
    float32 holding bf16 values, so the cast is exact)."""
    return {k: v.to(old[k].dtype) for k, v in new.items()}


class _StaticState:
    """The fixed buffers a captured decode graph reads and updates in place, and the hand-off rules that
    keep the states given to callers immutable (see the module docstring)."""

    def __init__(self, state: dict):
        self.buf = clone_state(state)
        self._last: dict | None = None           # the state handed out last; `buf` still holds its values

    def load(self, state: dict) -> None:
        """Make `buf` hold `state` (a no-op when `state` is the last handed-out one)."""
        if state is self._last:
            return
        for k, v in state.items():
            self.buf[k].copy_(v)
        self._last = None

    def hand_out(self) -> dict:
        """A snapshot of `buf` for the caller; the next `load` of it needs no copy."""
        self._last = clone_state(self.buf)
        return self._last


class _DecodeGraph:
    """One captured decode step for a fixed batch and state layout."""

    def __init__(self, runner: "CudaRunner", state: dict, warmup: int = 2):
        o, w, cfg = runner.ops, runner.weights, runner.cfg
        self.static = _StaticState(state)
        st = self.static.buf
        self.ids = torch.zeros((state["start"].shape[0], 1), dtype=torch.int64, device=o.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):            # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                graph.forward(o, w, cfg, st, self.ids)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            logits, new, streams = graph.forward(o, w, cfg, st, self.ids)
            for k, v in new.items():             # every new value is a fresh tensor (the graph is
                st[k].copy_(v)                   # functional), so these copies never read a written buffer
        self.logits, self.streams = logits, streams

    def run(self, state: dict, ids: np.ndarray):
        self.static.load(state)
        self.ids.copy_(torch.as_tensor(ids, dtype=torch.int64))
        self.graph.replay()
        return self.logits, self.static.hand_out(), self.streams


class CudaRunner(GraphRunner):
    def __init__(self, cfg, ops: TorchOps, weights: TorchWeights, prefill_chunk: int = 2048,
                 cuda_graphs: bool = True):
        super().__init__(cfg, ops, weights)
        self.prefill_chunk = prefill_chunk
        self.cuda_graphs = cuda_graphs and ops.device.type == "cuda"
        self._graphs: dict = {}

    def _new(self, specs) -> dict:
        st = cache.new_state(self.ops, specs)
        return {b.name: st[b.name].to(self.ops.state_dtype(b.kind)) for b in specs}

    def new_state(self, batch: int, max_len: int) -> dict:
        return self._new(cache.state_spec(self.cfg, batch, max_len))

    def new_mtp_state(self, batch: int, max_len: int) -> dict:
        return self._new(cache.mtp_state_spec(self.cfg, batch, max_len))

    def state_to_numpy(self, state: dict) -> dict:
        """Host copies; bf16 buffers as float32 (NumPy has no bfloat16; the conversion is exact)."""
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy() for k, v in state.items()}

    def _eager(self, state, ids: np.ndarray):
        o = self.ops
        logits, new, streams = graph.forward(o, self.weights, self.cfg, state, o.asarray(ids, "int"))
        return logits, _keep_dtypes(new, state), streams

    def _graph_for(self, state: dict) -> _DecodeGraph:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in state.items())
        if key not in self._graphs:
            self._eager(state, np.zeros((state["start"].shape[0], 1), dtype=np.int64))   # warm caches
            self._graphs[key] = _DecodeGraph(self, state)
        return self._graphs[key]

    def step(self, state: dict, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
        with torch.inference_mode():
            if ids.shape[1] == 1 and self.cuda_graphs:
                logits, new, streams = self._graph_for(state).run(state, ids)
                return self.ops.to_numpy(logits).copy(), new, streams.clone()
            outs, all_streams = [], []
            for a in range(0, ids.shape[1], self.prefill_chunk):
                logits, state, streams = self._eager(state, ids[:, a:a + self.prefill_chunk])
                outs.append(self.ops.to_numpy(logits))
                all_streams.append(streams)
            streams = all_streams[0] if len(all_streams) == 1 else torch.cat(all_streams, 1)
            return np.concatenate(outs, 1), state, streams

    def mtp_step(self, state: dict, streams, ids_next: np.ndarray):
        o = self.ops
        with torch.inference_mode():
            logits, new = graph.mtp_forward(o, self.weights, self.cfg, state, streams, o.asarray(ids_next, "int"))
            return np.asarray(o.to_numpy(logits)), _keep_dtypes(new, state)


def make_runner(cfg, ckpt, dtype="float32", emulate=False, device=None, kernels=None, prefill_chunk=2048,
                cuda_graphs=True, **_):
    """Runner for `dsv4.load(..., backend="cuda")`.  `device` defaults to CUDA when present, else the CPU;
    `kernels` None = Triton kernels on CUDA in float32/bfloat16, True = force (CPU: TRITON_INTERPRET=1)."""
    ops = TorchOps(dtype, emulate, device, kernels)
    weights = TorchWeights(ckpt, ops.dt, ops.device)
    weights.load_all()
    return CudaRunner(cfg, ops, weights, prefill_chunk, cuda_graphs)

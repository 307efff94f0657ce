"""`CudaRunner`: the eager graph runner plus chunked prefill and CUDA-graph decode.

Prefill is split into chunks of `prefill_chunk` tokens (the graph's causal rules make chunked prefill
exact), which bounds activation memory for long prompts.

Decode (one token per sequence) on a CUDA device replays a captured CUDA graph: the whole
`graph.forward` — every kernel launch of every layer — becomes one launch, which is what makes small-batch
decode fast.  The captured graph reads static state buffers and, at its end, copies the new state back
into them, so a decode step updates the state in place:

* the state a graph step returns *is* the runner's static buffers; feeding it back (the normal decode
  loop) costs no copy;
* any other state (from prefill, or an older snapshot) is first copied into the static buffers;
* consequently a state returned by a graph step is overwritten by the next graph step.  Keep a copy
  (`clone_state`) before decoding further if you need to return to it (e.g. speculative rollback).

One graph is captured per (batch, state shapes); everything the forward needs (weights, rope frequency
tables) is materialized by the eager warm-up run before capture, so no host transfer happens inside it.
"""

from __future__ import annotations

import numpy as np
import torch

from ...portable import graph
from ...portable.runtime import GraphRunner
from .ops import TorchOps
from .weights import TorchWeights


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


class _DecodeGraph:
    """One captured decode step for a fixed batch and state layout."""

    def __init__(self, runner: "CudaRunner", state: dict, warmup: int = 2):
        o, w, cfg = runner.ops, runner.weights, runner.cfg
        self.state = clone_state(state)
        self.ids = torch.zeros((next(iter(state.values())).shape[0], 1), dtype=torch.int64, device=o.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                graph.forward(o, w, cfg, self.state, self.ids)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            logits, new, streams = graph.forward(o, w, cfg, self.state, self.ids)
            for k, v in new.items():
                self.state[k].copy_(v)
        self.logits, self.streams = logits, streams

    def run(self, state: dict, ids: np.ndarray):
        for k, v in state.items():
            if v is not self.state[k]:
                self.state[k].copy_(v)
        self.ids.copy_(torch.as_tensor(ids, dtype=torch.int64))
        self.graph.replay()
        return self.logits, self.state, self.streams


class CudaRunner(GraphRunner):
    def __init__(self, cfg, ops: TorchOps, weights: TorchWeights, prefill_chunk: int = 2048,
                 cuda_graphs: bool = True):
        super().__init__(cfg, ops, weights)
        self.prefill_chunk = prefill_chunk
        self.cuda_graphs = cuda_graphs and ops.device.type == "cuda"
        self._graphs: dict = {}

    def _eager(self, state, ids: np.ndarray):
        o = self.ops
        logits, new, streams = graph.forward(o, self.weights, self.cfg, state, o.asarray(ids, "int"))
        return logits, new, streams

    def _graph_for(self, state: dict) -> _DecodeGraph:
        key = tuple((k, tuple(v.shape)) for k, v in state.items())
        if key not in self._graphs:
            self.weights.load_all()
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
        with torch.inference_mode():
            return super().mtp_step(state, streams, ids_next)


def make_runner(cfg, ckpt, dtype="float32", emulate=False, device=None, kernels=None, prefill_chunk=2048,
                cuda_graphs=True, **_):
    """Runner for `dsv4.load(..., backend="cuda")`.  `device` defaults to CUDA when present, else the CPU;
    `kernels` None = Triton kernels on CUDA in float32/bfloat16, True = force (CPU: TRITON_INTERPRET=1)."""
    ops = TorchOps(dtype, emulate, device, kernels)
    return CudaRunner(cfg, ops, TorchWeights(ckpt, ops.dt, ops.device), prefill_chunk, cuda_graphs)

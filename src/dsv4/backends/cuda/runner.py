"""`CudaRunner`: the eager graph runner plus chunked prefill and CUDA-graph decode over in-place states.

Prefill is split into chunks of `prefill_chunk` tokens (the graph's causal rules make chunked prefill
exact), which bounds activation memory for long prompts.

A step updates its state in place (`graph.forward` writes only the new rows of each buffer,
`TorchOps.write_rows`); `fork` gives an independent copy for callers that need the old state again.
Each buffer keeps the storage dtype it was created with (`TorchOps.state_buffer`).

Decode (one token per sequence, or the [B, k+1] verify step of speculative decoding: up to
`CAPTURED_TOKENS` tokens) on a CUDA device replays a captured CUDA graph: the whole `graph.forward` — every
kernel launch of every layer — becomes one launch, which is what makes small-batch decode fast.  A graph
reads and writes fixed addresses, and those addresses are the state's own buffers:

* a graph is captured for one state's buffers (so for its batch, format and capacity bucket) and one step
  length, and replayed only while that state still holds exactly those tensors; nothing is copied in or
  out per step (a speculative rollback writes `start` in place, `set_start`, so it keeps the binding);
* the step's writes land in the buffers directly; the one value the forward re-binds instead of writing
  in place (`start`, advanced by the chunk length) is copied back into the captured tensor at the end of
  the graph, so the state's buffer objects never change;
* a state that grows into the next capacity bucket (new entry buffers), or another state object (e.g. a
  fork), gets its own capture.  Graphs are kept in a small LRU cache; one whose state was resized or
  dropped is released when the next graph is looked up (it holds its buffers alive until then).

Capture runs under `TorchOps.static_shapes` (whole buffers, no host syncs), after warm-up runs on a fork
of the state that materialize everything the forward needs (compiled Triton kernels, cuBLAS workspaces,
device constants), so no host transfer or persistent allocation happens inside the capture.  Without a
CUDA device (or with `cuda_graphs=False`) every step runs eagerly.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import torch

from ...portable import cache, graph
from ...portable.runtime import GraphRunner
from .ops import TorchOps
from .weights import TorchWeights

CAPTURED_TOKENS = 8         # decode and verify steps (k + 1 ≤ 8: `speculative.MAX_DRAFT`)


class _DecodeGraph:
    """One captured decode step whose static buffers are one state's buffers."""

    def __init__(self, runner: "CudaRunner", state: cache.State, tokens: int = 1, warmup: int = 2):
        o, w, cfg, head = runner.ops, runner.weights, runner.cfg, runner.live_head     # (found before capture)
        self.state = weakref.ref(state)
        self.buffers = dict(state.buffers)         # the tensors the graph reads and writes
        self.ids = torch.zeros((state.batch, tokens), dtype=torch.int64, device=o.device)
        with o.static_shapes():
            scratch = state.fork(o)                # warm-up steps must not advance the state itself
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):          # warm-up off the default stream, as capture requires
                for _ in range(warmup):
                    graph.forward(o, w, cfg, scratch, self.ids, head)
            torch.cuda.current_stream().wait_stream(side)
            del scratch
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits, self.streams = graph.forward(o, w, cfg, state, self.ids, head)
                self.keep_buffers(state)

    def keep_buffers(self, state: cache.State) -> None:
        """Copy what the forward re-bound instead of writing in place (`start`) back into the captured
        tensor, and give that tensor back to the state (recorded in the graph when called in capture)."""
        for k, t in self.buffers.items():
            if state.buffers[k] is not t:
                t.copy_(state.buffers[k])
                state.buffers[k] = t

    def binds(self, state: cache.State) -> bool:
        """`state` still holds exactly the tensors this graph was captured on."""
        return state.buffers.keys() == self.buffers.keys() and all(
            state.buffers[k] is t for k, t in self.buffers.items())

    def live(self) -> bool:
        """Its state still exists and still holds the captured buffers (not resized)."""
        st = self.state()
        return st is not None and self.binds(st)

    def run(self, ids: np.ndarray):
        self.ids.copy_(torch.as_tensor(ids, dtype=torch.int64))
        self.graph.replay()
        return self.logits, self.streams


class CudaRunner(GraphRunner):
    def __init__(self, cfg, ops: TorchOps, weights: TorchWeights, state_format: str = "bf16",
                 prefill_chunk: int = 2048, cuda_graphs: bool = True, max_graphs: int = 4):
        super().__init__(cfg, ops, weights, state_format)
        self.prefill_chunk = prefill_chunk
        self.cuda_graphs = cuda_graphs and ops.device.type == "cuda"
        self.max_graphs = max_graphs
        self._graphs: OrderedDict = OrderedDict()      # (id(state), tokens) → _DecodeGraph, LRU first

    def _graph_for(self, state: cache.State, tokens: int) -> _DecodeGraph:
        for key in [k for k, g in self._graphs.items() if not g.live()]:
            del self._graphs[key]                      # resized or dropped states: release their buffers
        key = (id(state), tokens)
        g = self._graphs.get(key)
        if g is None or not g.binds(state):
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            g = self._graphs[key] = _DecodeGraph(self, state, tokens)
        self._graphs.move_to_end(key)
        return g

    def set_start(self, state: cache.State, start: np.ndarray) -> None:
        """In place: a captured graph is bound to the `start` tensor itself."""
        state.start.copy_(torch.as_tensor(np.asarray(start), dtype=state.start.dtype))

    def step(self, state: cache.State, ids: np.ndarray):
        o = self.ops
        ids = np.asarray(ids, dtype=np.int64)
        with torch.no_grad():
            self.reserve(state, ids.shape[1])
            if ids.shape[1] <= CAPTURED_TOKENS and self.cuda_graphs:
                logits, streams = self._graph_for(state, ids.shape[1]).run(ids)
                return o.to_numpy(logits).copy(), streams.clone()
            outs, all_streams = [], []
            for a in range(0, ids.shape[1], self.prefill_chunk):
                logits, streams = graph.forward(o, self.weights, self.cfg, state,
                                                o.asarray(ids[:, a:a + self.prefill_chunk], "int"), self.live_head)
                outs.append(o.to_numpy(logits))
                all_streams.append(streams)
            streams = all_streams[0] if len(all_streams) == 1 else torch.cat(all_streams, 1)
            return np.concatenate(outs, 1), streams

    def mtp_step(self, state: cache.State, streams, ids_next: np.ndarray, with_streams: bool = False,
                 draft: bool = False):
        with torch.no_grad():
            return super().mtp_step(state, streams, ids_next, with_streams, draft)

    def fork(self, state: cache.State) -> cache.State:
        with torch.no_grad():
            return super().fork(state)


def make_runner(cfg, ckpt, dtype="float32", emulate=False, state_format="bf16", device=None, kernels=None,
                prefill_chunk=2048, cuda_graphs=True, **_):
    """Runner for `dsv4.load(..., backend="cuda")`.  `device` defaults to CUDA when present, else the CPU;
    `kernels` None = Triton kernels on CUDA in float32/bfloat16, True = force (CPU: TRITON_INTERPRET=1);
    `state_format` "bf16" | "deploy" (`portable.cache`)."""
    ops = TorchOps(dtype, emulate, device, kernels)
    weights = TorchWeights(cfg, ckpt, ops.dt, ops.device)
    weights.load_all()
    return CudaRunner(cfg, ops, weights, state_format, prefill_chunk, cuda_graphs)

"""An onnxruntime session behind the runner interface of `portable/runtime.py`.

Why a runner of its own instead of `GraphRunner` over an `Ops`: the exported graph already is the whole
step, so a step is one `session.run` feeding the state buffers by the names the manifest gives.  The
graph returns only the rows the step wrote (`present.<name>.rows` at `present.<name>.index`), and the
runner writes them into its buffers in place, so a decode step moves O(1) rows of state, not the state.

The state is a `cache.State` over float32/int64 NumPy buffers (`NumpyOps` storage, names as in
`state_spec`), so states compare directly with the reference backend's and fork, grow (`State.reserve`
through the capacity buckets), stack and split the same way.
Entries are stored as computed ("bf16" format); the deploy format is refused at load.

Everything that can be wrong with an export directory is checked before onnxruntime sees it (a missing
manifest or one of another format version — with the command that re-exports it —, missing graph or
weight data, a data file of the wrong size, a config.json that differs from the exported one), because
onnxruntime's own errors for these name internal tensors, not the fix.  The weight mode (quantized or
dense) is the graph's business: the runner drives every export the same way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...export.manifest import ExportError, check_config, read_manifest
from ...portable import cache
from ...portable.reference import NumpyOps
from ...portable.runtime import StateRunner

_PREFERRED = ("CUDAExecutionProvider", "CoreMLExecutionProvider")


def default_providers() -> list[str]:
    """CUDA or CoreML when this onnxruntime build has them, always with the CPU provider as fallback."""
    available = ort.get_available_providers()
    return [p for p in _PREFERRED if p in available] + ["CPUExecutionProvider"]


class OnnxRunner(StateRunner):
    def __init__(self, cfg, export_dir, providers=None, threads: int | None = None):
        self.cfg, self.dir = cfg, Path(export_dir)
        self.manifest = m = read_manifest(self.dir)
        check_config(m, json.loads(json.dumps(cfg.to_dict())), self.dir)
        self.max_len = m["max_len"]
        self.min_capacity, self.capacity_multiple = m["capacity"]["min"], m["capacity"]["multiple"]
        self.limit: int | None = None          # the model's context (set by `Model`)
        self.ops = NumpyOps("float32")         # state storage: float32 / int64 buffers, written in place
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # No spin-waiting: speculative decoding runs the main and MTP sessions in turn, and a session's
        # intra-op threads spinning after its run took the cores from the other (measured on 2 shared
        # cores: a round 2-3x slower; plain decode itself 2x faster without it there).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = list(providers or default_providers())
        self._graphs = m["graphs"]
        self._sessions = {name: self._open(g["file"], opts) for name, g in self._graphs.items()}

    def _open(self, file: str, opts):
        try:
            return ort.InferenceSession(str(self.dir / file), opts, providers=self.providers)
        except Exception as e:         # onnxruntime raises its own exception types; name the file and the fix
            raise ExportError(f"{self.dir / file}: onnxruntime cannot load this graph ({e}); re-export the "
                              f"model with this dsv4 version") from None

    # ------------------------------------------------------------------ state
    def _limit(self) -> int:
        """The largest capacity: the context, rounded up to the capacities the graphs accept."""
        k = self.capacity_multiple
        return -(-(self.limit or self.max_len) // k) * k

    def _new(self, batch: int, capacity: int, mtp: bool) -> cache.State:
        if capacity > self.max_len:
            raise ExportError(f"{self.dir} was exported with a context of {self.max_len} tokens; "
                              f"{capacity} were asked (load with context≤{self.max_len} or re-export)")
        cap = max(self.min_capacity, cache.capacity_for(capacity, self._limit()))
        return cache.State.new(self.ops, self.cfg, batch, cap, "bf16", mtp=mtp)

    def new_state(self, batch: int, capacity: int = 0) -> cache.State:
        return self._new(batch, capacity, mtp=False)

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self._graphs

    def new_mtp_state(self, batch: int, capacity: int = 0) -> cache.State:
        if "mtp" not in self._graphs:
            raise ExportError(f"{self.dir} was exported without the MTP block (export with mtp=True)")
        return self._new(batch, capacity, mtp=True)

    def reserve(self, state: cache.State, n: int) -> None:
        """Grow `state` so n more tokens fit (a copy of the rows held, only at a bucket boundary)."""
        state.reserve(self.ops, self.position(state) + n, self._limit())

    # ------------------------------------------------------------------ steps
    def _run(self, graph: str, state: cache.State, feeds: dict) -> dict:
        """One session run; the step's new rows are written into `state`'s buffers in place."""
        g = self._graphs[graph]
        feed = {g["inputs"][k]: v for k, v in feeds.items()}
        names = list(g["outputs"].values())
        for e in g["state"]:
            feed[e["input"]] = state.buffers[e["name"]]
            names += [e["output"]] if "output" in e else [e["rows"], e["index"]]
        out = dict(zip(names, self._sessions[graph].run(names, feed)))
        for e in g["state"]:
            if "output" in e:
                state.buffers[e["name"]] = out[e["output"]]
            else:
                self.ops.write_rows(state.buffers[e["name"]], out[e["index"]], out[e["rows"]])
        return {k: out[v] for k, v in g["outputs"].items()}

    def step(self, state: cache.State, ids: np.ndarray):
        self.reserve(state, ids.shape[1])
        out = self._run("main", state, {"ids": np.ascontiguousarray(ids, dtype=np.int64)})
        return out["logits"], out.get("streams")

    draft_vocab = None          # the export's MTP graph scores the whole vocabulary

    def mtp_step(self, state: cache.State, streams, ids_next: np.ndarray, with_streams: bool = False,
                 draft: bool = False):
        """The export's MTP graph; with `with_streams` also its output streams, which chained drafts
        read (`portable.speculative.draft`).  Its head is part of the graph, so drafts (`draft`) are
        scored over the whole vocabulary too."""
        if "mtp" not in self._graphs:
            raise ExportError(f"{self.dir} was exported without the MTP block (export with mtp=True)")
        if streams is None:
            raise ExportError("the main graph returned no hidden streams; this export has no MTP block")
        self.reserve(state, ids_next.shape[1])
        out = self._run("mtp", state, {"ids": np.ascontiguousarray(ids_next, dtype=np.int64), "streams": streams})
        return (out["logits"], out["streams"]) if with_streams else out["logits"]


def make_runner(cfg, path, dtype: str = "float32", emulate: bool = False, state_format: str = "bf16",
                providers=None, threads=None, **_):
    """Runner for an export directory `path` (what `dsv4.load(OUT, backend="onnx")` passes)."""
    if emulate:
        raise ExportError("ONNX exports run the plain numerics; the quantization-aware emulation "
                          "(emulate=True) is available on the reference backend only")
    if state_format != "bf16":
        raise ExportError(f"ONNX exports store compressed entries as computed (state_format='bf16'); "
                          f"state_format={state_format!r} is not supported by the onnx backend")
    runner = OnnxRunner(cfg, path, providers=providers, threads=threads)
    exported = runner.manifest["dtype"]
    if dtype != exported:
        warnings.warn(f"{path} was exported in {exported}; running it as exported (dtype={dtype!r} ignored)",
                      stacklevel=3)
    return runner

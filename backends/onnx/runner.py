"""An onnxruntime session behind the runner interface of `portable/runtime.py`.

Why a runner of its own instead of `GraphRunner` over an `Ops`: the exported graph already is the whole
step, so a step is one `session.run` feeding the state buffers by the names the manifest gives and
reading the updated ones back.  State is a dict of NumPy arrays keyed like the reference backend's
(`start`, `L0.win`, ...), so states compare directly across backends.

Everything that can be wrong with an export directory is checked before onnxruntime sees it (missing
manifest, graph or weight data, a data file of the wrong size, a config.json that differs from the
exported one), because onnxruntime's own errors for these name internal tensors, not the fix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...export.manifest import ExportError, check_config, read_manifest

_PREFERRED = ("CUDAExecutionProvider", "CoreMLExecutionProvider")


def default_providers() -> list[str]:
    """CUDA or CoreML when this onnxruntime build has them, always with the CPU provider as fallback."""
    available = ort.get_available_providers()
    return [p for p in _PREFERRED if p in available] + ["CPUExecutionProvider"]


class OnnxRunner:
    def __init__(self, cfg, export_dir, providers=None, threads: int | None = None):
        self.cfg, self.dir = cfg, Path(export_dir)
        self.manifest = m = read_manifest(self.dir)
        check_config(m, json.loads(json.dumps(cfg.to_dict())), self.dir)
        self.max_len = m["max_len"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
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
    def _fresh(self, graph: str, batch: int, max_len: int) -> dict:
        if max_len > self.max_len:
            raise ExportError(f"{self.dir} was exported with a context of {self.max_len} tokens; "
                              f"{max_len} were asked (load with context≤{self.max_len} or re-export)")
        st = {}
        for e in self._graphs[graph]["state"]:
            shape = [batch if d == "batch" else d for d in e["shape"]]
            st[e["name"]] = np.full(shape, float(e["fill"]), dtype=e["dtype"])
        return st

    def new_state(self, batch: int, max_len: int) -> dict:
        return self._fresh("main", batch, max_len)

    def new_mtp_state(self, batch: int, max_len: int) -> dict:
        if "mtp" not in self._graphs:
            raise ExportError(f"{self.dir} was exported without the MTP block (export with mtp=True)")
        return self._fresh("mtp", batch, max_len)

    # ------------------------------------------------------------------ steps
    def _run(self, graph: str, state: dict, feeds: dict):
        g = self._graphs[graph]
        feed = {g["inputs"][k]: v for k, v in feeds.items()}
        for e in g["state"]:
            feed[e["input"]] = state[e["name"]]
        names = [g["outputs"]["logits"]] + [e["output"] for e in g["state"]]
        if "streams" in g["outputs"]:
            names.append(g["outputs"]["streams"])
        outs = self._sessions[graph].run(names, feed)
        new = {e["name"]: v for e, v in zip(g["state"], outs[1:])}
        return outs[0], new, (outs[-1] if "streams" in g["outputs"] else None)

    def step(self, state: dict, ids: np.ndarray):
        return self._run("main", state, {"ids": np.ascontiguousarray(ids, dtype=np.int64)})

    def mtp_step(self, state: dict, streams, ids_next: np.ndarray):
        if "mtp" not in self._graphs:
            raise ExportError(f"{self.dir} was exported without the MTP block (export with mtp=True)")
        if streams is None:
            raise ExportError("the main graph returned no hidden streams; this export has no MTP block")
        logits, new, _ = self._run("mtp", state, {"ids": np.ascontiguousarray(ids_next, dtype=np.int64),
                                                  "streams": streams})
        return logits, new

    def position(self, state: dict) -> int:
        return int(np.max(state["start"]))

    def state_to_numpy(self, state: dict) -> dict:
        return {k: np.asarray(v) for k, v in state.items()}


def make_runner(cfg, path, dtype: str = "float32", emulate: bool = False, providers=None, threads=None, **_):
    """Runner for an export directory `path` (what `dsv4.load(OUT, backend="onnx")` passes)."""
    if emulate:
        raise ExportError("ONNX exports run the plain numerics; the quantization-aware emulation "
                          "(emulate=True) is available on the reference backend only")
    runner = OnnxRunner(cfg, path, providers=providers, threads=threads)
    exported = runner.manifest["dtype"]
    if dtype != exported:
        warnings.warn(f"{path} was exported in {exported}; running it as exported (dtype={dtype!r} ignored)",
                      stacklevel=3)
    return runner

"""Weight stores for the MLX backend: the official layout (converted tensor by tensor on first use) and the
MLX-ready layout written by `convert` (loaded with `mx.load`, nothing left to convert).

Both answer `W[name]` with the official tensor names the graph uses and `W.experts(prefix)` with one
`ExpertBank` per layer.  Plain tensors keep their stored precision (bf16 stays bf16: MLX promotes it
exactly where the graph asks for float32), except those the graph always lifts to float32 (the head and
the router gate), which are kept in float32 so the lift is not repeated at every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from dsv4.portable.checkpoint import INDEX_NAME

from . import qlinear
from .qlinear import ExpertBank, QLinear

FORMAT_KEY = "dsv4_format"      # config.json entry of a converted directory
FORMAT_VERSION = 1
EXPERT_PROJ = ("w1", "w2", "w3")


def _lifted(name: str) -> bool:
    """Plain tensors the graph always reads through `hp` (kept in float32)."""
    return name == "head.weight" or name.endswith("ffn.gate.weight")


def converted_format(path) -> dict | None:
    """The `dsv4_format` entry of a converted directory's config.json (None for the official layout)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    fmt = json.loads(p.read_text()).get(FORMAT_KEY)
    return fmt if isinstance(fmt, dict) else None


def _plain(arr: mx.array, name: str) -> mx.array:
    if arr.dtype in (mx.int64, mx.uint64):
        return arr.astype(mx.int32)
    if _lifted(name):
        return arr.astype(mx.float32)
    return arr


class CheckpointWeights:
    """Official-layout checkpoint: quantized linears become `QLinear`s on first access (one tensor at a
    time, read from the memory-mapped shards), routed experts are stacked per layer into an `ExpertBank`."""

    def __init__(self, ckpt, bits: int | None = None, q_mode: str = "mxfp4"):
        self.ckpt, self.bits, self.q_mode = ckpt, bits, q_mode
        self._names = set(ckpt.names())
        self._cache: dict = {}

    def _linear(self, prefix: str) -> QLinear:
        return qlinear.from_quant(self.ckpt.quant_weight(prefix), self.bits, self.q_mode)

    def __getitem__(self, name):
        if name not in self._cache:
            if name.endswith(".weight") and name[:-7] + ".scale" in self._names:
                self._cache[name] = self._linear(name[:-7])
            else:
                arr = mx.array(np.asarray(self.ckpt.raw(name)))
                if self.ckpt.spec(name).dtype == "BF16":
                    arr = arr.view(mx.bfloat16)
                self._cache[name] = _plain(arr, name)
        return self._cache[name]

    def experts(self, prefix):
        if prefix not in self._cache:
            n = sum(1 for k in self._names if k.startswith(prefix) and k.endswith(".w1.weight"))
            projs = {p: qlinear.stack([self._linear(f"{prefix}{e}.{p}") for e in range(n)]) for p in EXPERT_PROJ}
            self._cache[prefix] = ExpertBank(**projs)
        return self._cache[prefix]

    def load_all(self) -> None:
        """Materialize every tensor now (before a step is compiled, so weights are constants of the trace)."""
        for name in sorted(self._names):
            if ".ffn.experts." in name:
                self.experts(name.split(".ffn.experts.")[0] + ".ffn.experts.")
            elif not name.endswith(".scale"):
                self[name]
        mx.eval([v for v in self._cache.values() if isinstance(v, mx.array)] +
                [a for v in self._cache.values() for a in _leaves(v)])

    def nbytes(self) -> int:
        """Bytes of the weights loaded so far, in their MLX forms."""
        return _nbytes(self._cache.values())


def _nbytes(values) -> int:
    return sum(a.nbytes for v in values for a in ([v] if isinstance(v, mx.array) else _leaves(v)))


def _leaves(v) -> list:
    if isinstance(v, QLinear):
        return [a for a in (v.w, v.scales, v.biases) if a is not None]
    if isinstance(v, ExpertBank):
        return _leaves(v.w1) + _leaves(v.w2) + _leaves(v.w3)
    return []


class ConvertedWeights:
    """A directory written by `convert`: every tensor already in its MLX form; `config.json`'s
    `dsv4_format.tensors` names each quantized linear's mode and bits."""

    def __init__(self, path, fmt: dict):
        path = Path(path)
        if fmt.get("backend") != "mlx" or fmt.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} was converted for {fmt.get('backend')!r} format version "
                             f"{fmt.get('version')!r}; this build reads mlx version {FORMAT_VERSION}")
        self.layouts = fmt["tensors"]
        index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        arrays: dict = {}
        for shard in sorted(set(index.values())):
            arrays.update(mx.load(str(path / shard)))
        self._arrays = arrays
        self._cache: dict = {}

    def _qlinear(self, prefix: str) -> QLinear:
        mode, bits = self.layouts[prefix]
        a = self._arrays
        return QLinear(a[prefix + ".weight"], a.get(prefix + ".scales"), a.get(prefix + ".biases"), mode, bits)

    def __getitem__(self, name):
        if name not in self._cache:
            prefix = name[:-7] if name.endswith(".weight") else None
            if prefix in self.layouts:
                self._cache[name] = self._qlinear(prefix)
            elif name in self._arrays:
                self._cache[name] = _plain(self._arrays[name], name)
            else:
                raise KeyError(f"tensor {name!r} is not in the converted checkpoint")
        return self._cache[name]

    def experts(self, prefix):
        if prefix not in self._cache:
            self._cache[prefix] = ExpertBank(**{p: self._qlinear(prefix + p) for p in EXPERT_PROJ})
        return self._cache[prefix]

    def load_all(self) -> None:
        mx.eval(list(self._arrays.values()))

    def nbytes(self) -> int:
        return _nbytes(self._arrays.values())

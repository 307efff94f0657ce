"""Weight stores for the MLX backend: the official layout (converted tensor by tensor on first use) and the
MLX-ready layout written by `convert` (loaded with `mx.load`, nothing left to convert).

Both are the schema-driven store of `portable.weights` (each tensor's role comes from the checkpoint
schema) with MLX conversions: `W[name]` gives the official tensor names the graph uses and
`W.experts(prefix)` one `ExpertBank` per layer.  Float tensors keep their stored precision (bf16 stays bf16:
MLX promotes it exactly where the graph asks for float32), except the FP32 role (what the graph always
reads in float32, the head and the router gate among them), which is held in float32 so the lift is not
repeated at every step (on MLX's CPU a bf16 → f32 conversion runs at ≈0.5 GB/s: the head's would cost more
per token than its f32 matmul).  Their memory is declared as `backends.catalog.HOLDINGS["mlx"]`.

Memory (medium benchmark config, 1.79 GB checkpoint): peak RSS after loading is the held weights plus the
interpreter — 1.10× the checkpoint from the official layout, 1.09× from a converted directory, where the
float32 head alone is +0.07× (+0.006× on V4-Flash's proportions).  Nothing is mapped and nothing is
staged twice: see `TensorReader` and `mx_buffer`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from dsv4.portable import quant
from dsv4.portable.checkpoint import EXPERT_PROJ, INDEX_NAME, NP_DTYPE
from dsv4.portable.weights import WeightStore

from . import qlinear
from .qlinear import ExpertBank, QLinear

FORMAT_KEY = "dsv4_format"      # config.json entry of a converted directory
FORMAT_VERSION = 1


def converted_format(path) -> dict | None:
    """The `dsv4_format` entry of a converted directory's config.json (None for the official layout)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    fmt = json.loads(p.read_text()).get(FORMAT_KEY)
    return fmt if isinstance(fmt, dict) else None


def _evaluated(arr: mx.array, stored: mx.array | None = None) -> mx.array:
    """`arr` evaluated; when it is a converted copy of `stored`, the stored buffer goes back to the system."""
    mx.eval(arr)
    if stored is not None and arr is not stored:
        del stored
        mx.clear_cache()
    return arr


def _float32(stored: mx.array) -> mx.array:
    return stored if stored.dtype == mx.float32 else _evaluated(stored.astype(mx.float32), stored)


MX_DTYPE = {np.dtype("u1"): mx.uint8, np.dtype("<u2"): mx.uint16, np.dtype("<f2"): mx.float16,
            np.dtype("<f4"): mx.float32, np.dtype("<i4"): mx.int32, np.dtype("<i8"): mx.int64}


def mx_buffer(shape: tuple, dtype) -> tuple[mx.array, np.ndarray]:
    """A fresh, evaluated MLX array and a writable NumPy view of its memory (MLX arrays export their buffer;
    CPU and Apple unified memory alike).  Reading a checkpoint tensor straight into it saves the staging
    copy that `mx.array(numpy)` would make — for an expert bank, the difference between the load's peak
    being the weights or the weights plus a bank.  The array must not be used by MLX until it is filled."""
    arr = mx.zeros(shape, dtype)
    mx.eval(arr)
    view = np.array(arr, copy=False)
    if not view.flags.c_contiguous or view.ctypes.data == 0:
        raise RuntimeError("MLX did not hand out a contiguous host buffer")
    return arr, view


class TensorReader:
    """Reads checkpoint tensors into fresh buffers with `Checkpoint.read` (bounded positional reads).

    Why not `Checkpoint.raw`'s memory map: every mapped page that has been read stays in the process's
    resident set for as long as the map lives, so converting through the map holds the checkpoint twice
    (its pages + the MLX copy).  A read goes through the page cache, which the kernel reclaims freely and
    which is not the process's memory."""

    def __init__(self, ckpt):
        self.ckpt = ckpt

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return self.ckpt.read(name, out)

    def read_mx(self, name: str) -> mx.array:
        """Tensor `name` as an MLX array in its stored dtype (BF16 as bfloat16), read into MLX memory."""
        spec = self.ckpt.spec(name)
        arr, view = mx_buffer(spec.shape, MX_DTYPE[NP_DTYPE[spec.dtype]])
        self.read(name, view)
        return arr.view(mx.bfloat16) if spec.dtype == "BF16" else arr

    def quant_weight(self, prefix: str) -> quant.QuantWeight:
        """`Checkpoint.quant_weight` (format checks included) with its data read rather than mapped (a
        parallel rank's part of a split weight is already a read copy: `weights.ShardReader`)."""
        qw = self.ckpt.quant_weight(prefix)

        def own(name, arr):
            return self.read(name) if isinstance(arr, np.memmap) else arr
        scale = None if qw.scale is None else own(prefix + ".scale", qw.scale)
        return replace(qw, data=own(prefix + ".weight", qw.data), scale=scale)


class CheckpointWeights(WeightStore):
    """Official-layout checkpoint: quantized linears become `QLinear`s (one tensor at a time, read with
    bounded reads), routed experts are stacked per layer and projection into an `ExpertBank`.

    Memory: plain tensors and FP4 expert banks are read straight into their MLX buffers; every other tensor
    is evaluated as soon as it is built, so the load's peak is the MLX weights plus one FP8 linear's staging
    copy.  Freed staging buffers are returned to the system rather than kept in MLX's allocator cache."""

    def __init__(self, cfg, ckpt, bits: int | None = None, q_mode: str = "mxfp4"):
        super().__init__(cfg, ckpt)
        self.bits, self.q_mode = bits, q_mode
        self.reader = TensorReader(ckpt)

    def linear(self, prefix: str) -> QLinear:
        """The quantized linear `prefix` in its MLX form, evaluated."""
        q = qlinear.from_quant(self.reader.quant_weight(prefix), self.bits, self.q_mode)
        mx.eval(*q.arrays().values())
        return q

    def plain(self, name):
        return _evaluated(self.reader.read_mx(name))

    def fp32(self, name):
        return _float32(self.reader.read_mx(name))

    def table(self, name):
        return _evaluated(mx.array(self.ids(name).astype(np.int32)))

    def bank(self, entry) -> ExpertBank:
        return ExpertBank(**{p: self.projection(entry.name, p, self.expert_ids(entry)) for p in EXPERT_PROJ})

    def projection(self, prefix: str, proj: str, experts: int | range) -> QLinear:
        """One projection of the routed experts under `prefix` (the first `experts`, or those of a range),
        stacked to [n, out, in]."""
        held = range(experts) if isinstance(experts, int) else experts
        n = len(held)
        names = [f"{prefix}{e}.{proj}" for e in held]
        w, s = self.ckpt.spec(names[0] + ".weight"), self.ckpt.spec(names[0] + ".scale")
        if w.dtype == "I8" and s.dtype == "F8_E8M0" and self.q_mode == "mxfp4":
            # FP4 stays mxfp4 whatever `bits` is: read the codes and scales straight into the stacked
            # layout (the bytes are already MLX's), with no per-expert arrays or stacking copy
            data, data_view = mx_buffer((n, w.shape[0], w.shape[1] // 4), mx.uint32)
            scales, scales_view = mx_buffer((n,) + s.shape, mx.uint8)
            for e, name in enumerate(names):
                self.reader.read(name + ".weight", data_view[e].view(np.uint8))
                self.reader.read(name + ".scale", scales_view[e])
            q = QLinear(data, scales, None, "mxfp4", 4)
        else:
            q = qlinear.stack([self.linear(name) for name in names])
        mx.eval(*q.arrays().values())
        return q

    def load_all(self) -> None:
        """Materialize every tensor now (before a step is compiled, so weights are constants of the trace)."""
        super().load_all()
        mx.clear_cache()

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


class ConvertedWeights(WeightStore):
    """A directory written by `convert`: every tensor already in its MLX form; `config.json`'s
    `dsv4_format.tensors` names each quantized linear's mode and bits.  The roles still come from the
    schema (the FP32 ones are lifted to float32 as they load, replacing their stored form)."""

    def __init__(self, cfg, ckpt, fmt: dict):
        super().__init__(cfg, ckpt)
        path = Path(ckpt.path)
        if fmt.get("backend") != "mlx" or fmt.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} was converted for {fmt.get('backend')!r} format version "
                             f"{fmt.get('version')!r}; this build reads mlx version {FORMAT_VERSION}")
        self.layouts = fmt["tensors"]
        index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        arrays: dict = {}
        for shard in sorted(set(index.values())):
            arrays.update(mx.load(str(path / shard)))
        self._arrays = arrays

    def _array(self, name: str) -> mx.array:
        """The stored array `name`, read now (reported to the progress watcher) and held by the store's cache
        from now on, not by the loaded shards."""
        if name not in self._arrays:
            raise KeyError(f"tensor {name!r} is not in the converted checkpoint {self.ckpt.path}")
        stored = self._arrays.pop(name)
        mx.eval(stored)
        self.ckpt.report(stored.nbytes)
        return stored

    def linear(self, prefix: str) -> QLinear:
        mode, bits = self.layouts[prefix]
        w = self._array(prefix + ".weight")
        scales, biases = (self._array(n) if n in self._arrays else None
                          for n in (prefix + ".scales", prefix + ".biases"))
        return QLinear(w, scales, biases, mode, bits)

    def plain(self, name):
        return self._array(name)

    def fp32(self, name):
        return _float32(self._array(name))

    def table(self, name):
        stored = self._array(name)
        return _evaluated(stored.astype(mx.int32), stored)

    def bank(self, entry) -> ExpertBank:
        return ExpertBank(**{p: self.linear(entry.name + p) for p in EXPERT_PROJ})

    def load_all(self) -> None:
        """Read every tensor now, one at a time (reported to the checkpoint's progress watcher)."""
        super().load_all()
        mx.clear_cache()

    def nbytes(self) -> int:
        return _nbytes(self._cache.values())

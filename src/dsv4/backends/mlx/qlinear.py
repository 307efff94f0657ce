"""Compact linear weights on MLX: how each checkpoint format maps onto MLX's quantized matmuls.

V4 stores experts as FP4 (e2m1, low nibble first, one E8M0 power-of-two scale per 32 inputs) and the other
linears as FP8 e4m3 with one E8M0 scale per 128×128 block.  MLX's `mxfp4` / `mxfp8` modes are exactly these
element codes with one E8M0 scale per 32 inputs, packed low bits first into little-endian uint32 words, so:

| checkpoint       | MLX form                                       | cost vs stored | error vs float reference |
|------------------|------------------------------------------------|----------------|--------------------------|
| FP4 + E8M0 /32   | `mxfp4`: the checkpoint bytes viewed as uint32 | same bytes     | none (bit-exact)         |
| FP8 + E8M0 /128² | `mxfp8`: e4m3 bytes as is, the block scale     | +1/32 (scales) | none (bit-exact)         |
|                  | repeated to one byte per 32 inputs             |                |                          |
| FP8 + F32 scales | `mxfp8` when every scale is a power of two in  | +1/32          | none                     |
| (-Base experts)  | E8M0 range, else affine 8-bit (below)          |                |                          |
| BF16 / F32       | a plain array in its stored dtype              | same           | none                     |

Requantized forms (chosen with `bits` / `q_mode`, at load or by `convert`).  Weight error = relative
Frobenius error ‖Ŵ−W‖/‖W‖ against the dequantized checkpoint weight, on normal random weights; logits
error = per-position ‖out−ref‖/‖ref‖ against the float64 reference over 64 positions of the random tiny
checkpoints (tiny / tiny2), whose untrained weights make them far more sensitive than a trained model:

| target (bits, q_mode)          | weight err FP8 | weight err FP4 | bytes/weight | logits median | argmax agree |
|--------------------------------|----------------|----------------|--------------|---------------|--------------|
| native (None or 8, "mxfp4")    | 0 (bit-exact)  | 0 (bit-exact)  | 1.03 / 0.53  | ≤ 2e-6        | 1.0          |
| FP8 → mxfp4 (4, "mxfp4")       | 0.12           | 0 (kept)       | 0.53         | 0.41 / 0.41   | 0.44 / 0.44  |
| affine 8-bit (8, "affine")     | 0.0074         | 0.0071         | 1.125        | 0.023 / 0.023 | 0.92 / 0.91  |
| affine 4-bit (4, "affine")     | 0.082          | 0.087          | 0.625        | 0.35 / 0.38   | 0.48 / 0.47  |

Affine scales and biases are bf16 with groups of 32, as mlx-lm stores them.
tests/backends/mlx/test_qlinear.py (weight errors) and test_formats_convert.py (logits errors) hold each
form to these numbers with margin.

`QLinear.apply` always runs these quantized kernels (decode, and prefill on Metal, whose quantized matmuls
read each weight once per chunk).  On MLX's CPU backend the quantized matmul of many rows is slower than a
float32 BLAS matmul (measured 250 vs 90 ms for 512 rows × a 512×256 mxfp8 weight), so `MlxOps` decodes each
weight once per prefill into a dense float32 copy held for that run (`MlxOps.dense_run`) — the same values,
since every form above decodes exactly to float32.

Weights with an input size that is not a multiple of 32 cannot be grouped; they stay dense in their
stored precision (none of V4's linears is such a weight).  Nothing here ever dequantizes a whole model:
requantization goes one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from dsv4.portable import quant

GROUP = 32
MODES = ("mxfp4", "mxfp8", "affine", "dense")
Q_MODES = ("mxfp4", "affine")


@dataclass(frozen=True)
class QLinear:
    """One linear weight [.., out, in] in an MLX form; leading dims (experts, groups) are batch dims.

    mode "mxfp4"/"mxfp8": w uint32 packed codes, scales uint8 E8M0, no biases.
    mode "affine":        w uint32 packed ints, scales and biases bf16 per group of 32.
    mode "dense":         w the float matrix itself (bf16 or f32), no scales."""

    w: mx.array
    scales: mx.array | None
    biases: mx.array | None
    mode: str
    bits: int

    @property
    def shape(self) -> tuple:
        """Logical (.., out, in)."""
        if self.mode == "dense":
            return tuple(self.w.shape)
        return tuple(self.w.shape[:-1]) + (self.w.shape[-1] * 32 // self.bits,)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.scales, self.biases) if a is not None)

    def _kw(self):
        return dict(group_size=GROUP, bits=self.bits, mode=self.mode)

    def apply(self, x, rhs_indices=None, sorted_indices=False):
        """x Wᵀ; with `rhs_indices` the batch of W is gathered (experts) as in `mx.gather_qmm`, and
        `sorted_indices` promises they are ascending (rows grouped by expert), which lets the GPU kernels
        walk each expert's weights once for all its rows."""
        if self.mode == "dense":
            wt = mx.swapaxes(self.w, -1, -2)
            if rhs_indices is None:
                return mx.matmul(x, wt)
            return mx.gather_mm(x, wt.astype(x.dtype), rhs_indices=rhs_indices, sorted_indices=sorted_indices)
        if rhs_indices is None:
            return mx.quantized_matmul(x, self.w, self.scales, self.biases, transpose=True, **self._kw())
        return mx.gather_qmm(x, self.w, self.scales, self.biases, rhs_indices=rhs_indices, transpose=True,
                             sorted_indices=sorted_indices, **self._kw())

    def dense(self, dtype=mx.float32):
        if self.mode == "dense":
            return self.w.astype(dtype)
        return mx.dequantize(self.w, self.scales, self.biases, dtype=dtype, **self._kw())

    def grouped(self, groups: int) -> "QLinear":
        """The same bytes viewed as `groups` stacked [out/groups, in] matrices (row blocks)."""
        def split(a):
            return None if a is None else mx.reshape(a, (groups, a.shape[0] // groups, a.shape[1]))
        return replace(self, w=split(self.w), scales=split(self.scales), biases=split(self.biases))

    def arrays(self) -> dict:
        """Tensors to save, by suffix (the converted format)."""
        out = {"weight": self.w}
        if self.scales is not None:
            out["scales"] = self.scales
        if self.biases is not None:
            out["biases"] = self.biases
        return out


@dataclass(frozen=True)
class ExpertBank:
    """The routed experts of one layer, each projection stacked to [E, out, in] for gather matmuls."""

    w1: QLinear
    w2: QLinear
    w3: QLinear

    def __len__(self):
        return self.w1.w.shape[0]


# ---------------------------------------------------------------------- building from checkpoint formats
def _u32(packed: np.ndarray) -> mx.array:
    """Row-major bytes [.., n] → uint32 words [.., n/4] (little-endian: first byte = lowest bits)."""
    a = np.ascontiguousarray(packed, dtype=np.uint8)
    return mx.array(a.view("<u4"))


def _e8m0(scale: np.ndarray) -> np.ndarray | None:
    """E8M0 bytes for a scale array (uint8 as is; float32 only if every value is a power of two)."""
    if scale.dtype == np.uint8:
        return np.asarray(scale)
    try:
        return quant.f32_to_e8m0(scale)
    except ValueError:
        return None


def _quantize(dense: np.ndarray, mode: str, bits: int) -> QLinear:
    """Requantize one float matrix with `mx.quantize` (affine keeps bf16 scales/biases, as mlx-lm does)."""
    w = mx.array(np.asarray(dense, dtype=np.float32))
    if mode == "affine":
        wq, s, b = mx.quantize(w.astype(mx.bfloat16), group_size=GROUP, bits=bits, mode="affine")
        return QLinear(wq, s, b, "affine", bits)
    wq, s = mx.quantize(w, group_size=GROUP, bits=bits, mode=mode)
    return QLinear(wq, s, None, mode, bits)


def from_quant(qw: quant.QuantWeight, bits: int | None = None, q_mode: str = "mxfp4") -> QLinear:
    """A checkpoint weight in its MLX form.

    bits=None keeps every weight in its native precision (bit-exact; see the table above).
    q_mode "mxfp4": bits=4 requantizes FP8 weights to mxfp4; bits=8 keeps FP8 as mxfp8.  FP4 stays mxfp4.
    q_mode "affine": every FP8/FP4 weight becomes affine `bits` (default 8) with groups of 32."""
    if q_mode not in Q_MODES:
        raise ValueError(f"q_mode must be one of {', '.join(Q_MODES)}, got {q_mode!r}")
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    out_f, in_f = qw.shape
    if qw.fmt == "float" or in_f % GROUP:
        data = np.asarray(qw.data)
        if data.dtype == np.uint16:
            return QLinear(mx.array(data).view(mx.bfloat16), None, None, "dense", 16)
        return QLinear(mx.array(quant.dequantize(qw, np.float32)), None, None, "dense", 32)
    if q_mode == "affine":
        return _quantize(quant.dequantize(qw, np.float32), "affine", bits or 8)
    if qw.fmt == "fp4":
        scale = _e8m0(np.asarray(qw.scale))
        if scale is not None:
            return QLinear(_u32(qw.data), mx.array(scale), None, "mxfp4", 4)
        return _quantize(quant.dequantize(qw, np.float32), "affine", 8)
    if bits == 4:
        return _quantize(quant.dequantize(qw, np.float32), "mxfp4", 4)
    scale = _e8m0(np.asarray(qw.scale))
    if scale is None:
        return _quantize(quant.dequantize(qw, np.float32), "affine", 8)
    per32 = np.repeat(np.repeat(scale, quant.FP8_BLOCK, axis=0)[:out_f], quant.FP8_BLOCK // GROUP, axis=1)
    return QLinear(_u32(qw.data), mx.array(np.ascontiguousarray(per32[:, :in_f // GROUP])), None, "mxfp8", 8)


def stack(parts: list[QLinear]) -> QLinear:
    """Experts [E] of one projection → one QLinear with a leading expert axis."""
    first = parts[0]
    if any(p.mode != first.mode or p.bits != first.bits for p in parts):
        raise ValueError("experts of one layer must share a format to be stacked")

    def st(attr):
        return None if getattr(first, attr) is None else mx.stack([getattr(p, attr) for p in parts])
    return QLinear(st("w"), st("scales"), st("biases"), first.mode, first.bits)

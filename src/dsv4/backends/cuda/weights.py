"""Device-resident weights that stay in their stored precision until the matmul that uses them.

FP8 linears are `torch.float8_e4m3fn` [out, in] with float32 block scales [ceil(out/128), ceil(in/128)];
FP4 experts are packed uint8 [out, in/2] (low nibble = even column) with float32 per-32 scales; plain
tensors (norms, hc, gates, embeddings, BF16 compressor weights) are decoded once into the compute dtype.
Scales are decoded to float32 at load: they are 1/16384 (FP8) or 1/16 (FP4, as bytes → 1/4) of the
weight bytes, and a float32 scale is what both the torch dequantization and the Triton kernels read.

Routed experts of one layer are stacked into an `ExpertBank` ([E, out, in] data, [E, ...] scales) so a
grouped kernel can address every expert through one pointer; indexing the bank still yields per-expert
(w1, w2, w3) views, which is what the default `Ops.moe` decomposition consumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...portable import quant
from ...portable.checkpoint import EXPERT_PROJ
from ...portable.weights import WeightStore
from .numerics import E2M1_TABLE


# byte → (value of the low nibble, value of the high nibble): one gather decodes two packed FP4 weights
FP4_PAIRS = np.stack([E2M1_TABLE[np.arange(256) & 0xF], E2M1_TABLE[np.arange(256) >> 4]], -1)
_FP4_PAIRS_ON: dict = {}     # (device, dtype) → FP4_PAIRS there: uploaded once, never inside a graph capture


def _fp4_pairs(device, dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _FP4_PAIRS_ON:
        _FP4_PAIRS_ON[key] = torch.as_tensor(FP4_PAIRS, device=device, dtype=dtype)
    return _FP4_PAIRS_ON[key]


@dataclass(frozen=True, eq=False)
class TorchQuant:
    """A quantized linear weight on the device: fmt "fp8" or "fp4", logical shape (out, in)."""

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple


def to_torch_quant(qw: quant.QuantWeight, device) -> TorchQuant:
    scale = torch.as_tensor(quant.scale_f32(np.asarray(qw.scale)), device=device)
    data = torch.as_tensor(np.array(qw.data), device=device)
    if qw.fmt == "fp8":
        data = data.view(torch.float8_e4m3fn)
    return TorchQuant(qw.fmt, data, scale, tuple(qw.shape))


def dequantize(w: TorchQuant, dtype) -> torch.Tensor:
    """Dense [out, in] (or [E, out, in] for a stacked bank) in `dtype`: exact products of codes and scales."""
    m, n = w.shape
    lead = w.data.shape[:-2]
    if w.fmt == "fp8":
        b = quant.FP8_BLOCK
        s = w.scale.repeat_interleave(b, -2)[..., :m, :].repeat_interleave(b, -1)[..., :n]
        return w.data.to(dtype) * s.to(dtype)
    vals = _fp4_pairs(w.data.device, dtype)[w.data.long()].reshape(*lead, m, n)
    return vals * w.scale.to(dtype).repeat_interleave(quant.FP4_BLOCK, -1)


class ExpertBank:
    """The routed experts of one layer, stacked per projection: w1/w3 [E, I, D], w2 [E, D, I]."""

    def __init__(self, w1: TorchQuant, w2: TorchQuant, w3: TorchQuant, count: int):
        self.w1, self.w2, self.w3, self.count = w1, w2, w3, count

    def __len__(self):
        return self.count

    def __getitem__(self, e):
        if not 0 <= e < self.count:
            raise IndexError(e)
        return tuple(TorchQuant(w.fmt, w.data[e], w.scale[e], w.shape) for w in (self.w1, self.w2, self.w3))


def _stack(qws: list, device) -> TorchQuant:
    ts = [to_torch_quant(q, device) for q in qws]
    return TorchQuant(ts[0].fmt, torch.stack([t.data for t in ts]), torch.stack([t.scale for t in ts]),
                      ts[0].shape)


class TorchWeights(WeightStore):
    """The torch conversions for the schema-driven store (`portable.weights`): linears as `TorchQuant` on
    `device`, float tensors in the compute dtype, id tables int64, each layer's experts one `ExpertBank`.
    Its memory is declared as `backends.catalog.HOLDINGS["cuda"]`."""

    def __init__(self, cfg, ckpt, dtype: torch.dtype, device):
        super().__init__(cfg, ckpt)
        self.dt, self.device = dtype, device

    def linear(self, prefix):
        return to_torch_quant(self.ckpt.quant_weight(prefix), self.device)

    def plain(self, name):
        return torch.as_tensor(self.ckpt.array(name, np.float32), device=self.device).to(self.dt)

    def table(self, name):
        return torch.as_tensor(self.ids(name), device=self.device)

    def bank(self, entry):
        held = self.expert_ids(entry)
        banks = [_stack([self.ckpt.quant_weight(f"{entry.name}{e}.{w}") for e in held], self.device)
                 for w in EXPERT_PROJ]
        return ExpertBank(*banks, len(held))

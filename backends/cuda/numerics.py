"""Torch versions of the checkpoint codecs and of the official quantization emulation (model spec §8.2, §9.3).

Why separate from `portable.quant`: that module works on NumPy arrays on the host, while these run on the
device inside a forward pass (and under CUDA graphs), so they must be pure torch ops with no host sync.
Every rounding is exact (frexp/ldexp on the binade, `torch.round` is round-half-to-even), so the float32
and float64 paths agree with the NumPy codecs bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from ...portable import quant

E2M1_TABLE = quant.E2M1                                   # nibble → value
E8M0_TABLE = quant.e8m0_to_f32(np.arange(256, dtype=np.uint8))  # byte → 2^(b−127)


def _round_grid(x: torch.Tensor, mbits: int, emin: int) -> torch.Tensor:
    """Round to nearest-even on a float grid with `mbits` mantissa bits and min normal exponent `emin`."""
    e = torch.clamp(torch.frexp(x)[1] - 1, min=emin)
    step = torch.ldexp(torch.ones_like(x), e - mbits)
    return torch.round(x / step) * step


def _pow2_ceil(r: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ≥ r (r > 0): the E8M0 scale the official code derives from the exponent bits."""
    m, e = torch.frexp(r)
    return torch.ldexp(torch.ones_like(r), e - (m == 0.5).to(e.dtype))


def _blockwise(x: torch.Tensor, block: int, fmax: float, floor: float, mbits: int, emin: int) -> torch.Tensor:
    shape = x.shape
    xb = x.reshape(*shape[:-1], shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True).to(torch.float32)
    s = _pow2_ceil(torch.clamp(amax, min=floor) * np.float32(1 / fmax)).to(x.dtype)
    return (_round_grid(torch.clamp(xb / s, -fmax, fmax), mbits, emin) * s).reshape(shape)


def act_fp8_round(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantize-dequantize through e4m3 in blocks of the last axis (the official act_quant)."""
    return _blockwise(x, block, quant.E4M3_MAX, 1e-4, 3, -6)


def act_fp4_round(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantize-dequantize through e2m1 in blocks of the last axis (indexer q and keys)."""
    return _blockwise(x, block, quant.E2M1_MAX, quant.E2M1_MAX * 2.0 ** -126, 1, 0)

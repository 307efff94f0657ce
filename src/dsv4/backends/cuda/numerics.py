"""Torch versions of the checkpoint codecs and of the official quantization emulation (model spec §8.2, §9.3).

Why separate from `portable.quant`: that module works on NumPy arrays on the host, while these run on the
device inside a forward pass (and under CUDA graphs), so they must be pure torch ops with no host sync.
Every rounding is exact (frexp/ldexp on the binade, `torch.round` is round-half-to-even), so the float32
and float64 paths agree with the NumPy codecs bit for bit.  The deploy-format state codecs (FP8 e4m3 and
FP4 e2m1 codes with E8M0 block scales) live here too, for the same reason.
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


def _block_scales(x: torch.Tensor, block: int, fmax: float, floor: float):
    """x as [..., n/block, block] and its float32 power-of-two scales [..., n/block, 1] (the fp32 amax rule of
    `quant._block_scales`: 2^⌈log2(max(amax, floor)·fp32(1/fmax))⌉)."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True).to(torch.float32)
    return xb, _pow2_ceil(torch.clamp(amax, min=floor) * np.float32(1 / fmax))


def _scaled(x: torch.Tensor, block: int, fmax: float, floor: float, mbits: int, emin: int):
    """(x/s clamped to ±fmax, the same rounded to the code grid, the scales s): blocks of the last axis."""
    xb, s = _block_scales(x, block, fmax, floor)
    c = torch.clamp(xb / s.to(x.dtype), -fmax, fmax)
    return c, _round_grid(c, mbits, emin), s


def act_fp8_round(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantize-dequantize through e4m3 in blocks of the last axis (the official act_quant)."""
    _, v, s = _scaled(x, block, quant.E4M3_MAX, 1e-4, 3, -6)
    return (v * s.to(x.dtype)).reshape(x.shape)


def act_fp4_round(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantize-dequantize through e2m1 in blocks of the last axis (indexer q and keys)."""
    _, v, s = _scaled(x, block, quant.E2M1_MAX, quant.E2M1_MAX * 2.0 ** -126, 1, 0)
    return (v * s.to(x.dtype)).reshape(x.shape)


# ---------------------------------------------------------------------- deploy-format state codecs (§5)
def _e8m0_bytes(s: torch.Tensor) -> torch.Tensor:
    """Powers of two → E8M0 bytes (the biased exponent)."""
    return (torch.frexp(s)[1] + 126).to(torch.uint8)


def encode_fp8(x: torch.Tensor, block: int):
    """Values [..., n] → (e4m3 bytes [..., n], E8M0 scale bytes [..., n/block]); bit-exact with
    `quant.encode_fp8_blocks` (the grid value is exact in e4m3, so the cast to float8 does no rounding)."""
    _, v, s = _scaled(x, block, quant.E4M3_MAX, 1e-4, 3, -6)
    codes = v.to(torch.float8_e4m3fn).view(torch.uint8).reshape(x.shape)
    return codes, _e8m0_bytes(s[..., 0])


def e2m1_grid(device) -> torch.Tensor:
    """The 8 non-negative e2m1 values in code order (code = position; bit 3 is the sign)."""
    return torch.as_tensor(E2M1_TABLE[:8], device=device)


def e2m1_values(device) -> torch.Tensor:
    return torch.as_tensor(E2M1_TABLE, device=device)


def encode_fp4(x: torch.Tensor, block: int, grid: torch.Tensor):
    """Values [..., n] → (packed e2m1 bytes [..., n/2], low nibble first; E8M0 scale bytes [..., n/block]);
    bit-exact with `quant.encode_fp4_blocks`.  `grid` = `e2m1_grid` on x's device."""
    c, v, s = _scaled(x, block, quant.E2M1_MAX, quant.E2M1_MAX * 2.0 ** -126, 1, 0)
    code = torch.bucketize(v.abs(), grid.to(v.dtype)).to(torch.uint8) | (torch.signbit(c).to(torch.uint8) << 3)
    nib = code.reshape(x.shape)
    return nib[..., 0::2] | (nib[..., 1::2] << 4), _e8m0_bytes(s[..., 0])


def e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.float8_e4m3fn).to(torch.float32)


def unpack_fp4(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., K] → values [..., 2K] through `table` (`e2m1_values`)."""
    nib = torch.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return table[nib.long()]


def decode_blocks(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """values [..., n] × scales [..., n/block] (float32), one scale per block of the last axis."""
    n = values.shape[-1]
    return (values.reshape(*values.shape[:-1], n // block, block) * scales[..., None]).reshape(values.shape)

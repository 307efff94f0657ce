"""Number formats of the V4 checkpoint and of the official numerics, in plain numpy.

Why our own codecs: numpy has no bf16 / float8 / e2m1 types, and the checkpoint (model spec §8.2) stores
BF16 as raw 16-bit words, F8_E4M3 / F8_E8M0 / packed FP4 as raw bytes.  Everything here works on those
raw integer arrays, so a weight can stay an `np.memmap` view of the file until it is dequantized.

All rounding goes through one exact routine, `_round_grid`: a float64/float32 value is rounded to a
binary float grid with `mbits` mantissa bits and a minimum normal exponent (below it the grid is the
subnormal one), ties to even.  Division by a power of two and `np.round` are exact, so the result is
the true round-to-nearest-even for any input width — no double rounding through float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BF16_MAX = (2 - 2 ** -7) * 2.0 ** 127
E4M3_MAX = 448.0
E2M1_MAX = 6.0
FP8_BLOCK = 128   # weight block (rows and columns) of FP8 weights
FP4_BLOCK = 32    # consecutive input elements sharing one FP4 scale


def _round_grid(x: np.ndarray, mbits: int, emin: int) -> np.ndarray:
    """Round to nearest (ties to even) on a float grid with `mbits` mantissa bits, min normal exponent `emin`.

    No upper range limit: callers saturate or overflow as their format demands.  NaN stays NaN.
    """
    e = np.maximum(np.frexp(x)[1] - 1, emin)           # exponent of the binade (clamped: subnormals)
    q = np.ldexp(np.ones_like(x), e - mbits)            # grid step in that binade
    return np.round(x / q) * q


def _ceil_log2(r: np.ndarray) -> np.ndarray:
    """Exact ceil(log2(r)) for r > 0 (what the official code gets from the exponent bits)."""
    m, e = np.frexp(r)
    return e - (m == 0.5)


def _pow2_ceil(r: np.ndarray) -> np.ndarray:
    """Smallest power of two ≥ r, in r's dtype."""
    return np.ldexp(np.ones_like(r), _ceil_log2(r))


# ---------------------------------------------------------------------- bf16
def bf16_to_f32(u: np.ndarray) -> np.ndarray:
    """Raw bf16 words (uint16) → float32 (exact: bf16 is the top half of a float32)."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_nonfinite(u: np.ndarray) -> np.ndarray:
    """Which raw bf16 words (uint16) are NaN or ±Inf: those whose exponent bits are all ones."""
    return (np.asarray(u, dtype=np.uint16) & np.uint16(0x7F80)) == 0x7F80


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32/float64 values to bf16 precision (RNE, overflow → inf, NaN kept); same dtype out.

    float32 uses the usual bit trick (fast on large weights); float64 goes through the exact grid
    rounding so a value is rounded once, not twice via float32.
    """
    x = np.asarray(x)
    if x.dtype == np.float32:
        b = x.view(np.uint32)
        r = ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)
        return np.where(np.isnan(x), x, r)
    x = x.astype(np.float64, copy=False)
    r = _round_grid(x, 7, -126)
    return np.where(np.abs(r) > BF16_MAX, np.copysign(np.inf, x), r)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Float values → raw bf16 words (uint16), round-to-nearest-even, NaN kept as a quiet NaN."""
    x = np.asarray(x)
    r = round_bf16(x if x.dtype == np.float32 else x.astype(np.float64)).astype(np.float32)
    return (r.view(np.uint32) >> 16).astype(np.uint16)


# ---------------------------------------------------------------------- float8_e4m3fn
def _e4m3_table() -> np.ndarray:
    c = np.arange(128)
    e, m = c >> 3, c & 7
    pos = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * 2.0 ** (e - 7))
    pos[0x7F] = np.nan
    return np.concatenate([pos, -pos]).astype(np.float32)


_E4M3 = _e4m3_table()
_E4M3_POS = _E4M3[:127].astype(np.float64)   # codes 0x00..0x7E are increasing in value


def e4m3_to_f32(u: np.ndarray) -> np.ndarray:
    """Raw float8_e4m3fn bytes → float32 (0x7F / 0xFF are NaN; 0x80 is -0)."""
    return _E4M3[np.asarray(u, dtype=np.uint8)]


def e4m3_nonfinite(u: np.ndarray) -> np.ndarray:
    """Which raw float8_e4m3fn bytes are NaN (0x7F, 0xFF; the format has no infinities)."""
    return (np.asarray(u, dtype=np.uint8) & np.uint8(0x7F)) == 0x7F


def f32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """Float values → float8_e4m3fn bytes: RNE, finite values saturate to ±448, ±inf and NaN → NaN."""
    x = np.asarray(x, dtype=np.float64)
    v = np.clip(_round_grid(x, 3, -6), -E4M3_MAX, E4M3_MAX)
    sign = np.signbit(x).astype(np.uint8) << 7
    code = np.searchsorted(_E4M3_POS, np.abs(v)).astype(np.uint8)   # exact match: v is on the grid
    return np.where(np.isfinite(x), code, np.uint8(0x7F)) | sign


# ---------------------------------------------------------------------- E8M0 scales
_E8M0 = np.append(np.ldexp(1.0, np.arange(255) - 127), np.nan).astype(np.float32)


def e8m0_to_f32(u: np.ndarray) -> np.ndarray:
    """Raw E8M0 bytes → float32 2^(b−127); 0xFF is NaN (b = 0 gives the float32 subnormal 2^−127)."""
    return _E8M0[np.asarray(u, dtype=np.uint8)]


def e8m0_nonfinite(u: np.ndarray) -> np.ndarray:
    """Which raw E8M0 bytes are NaN (0xFF)."""
    return np.asarray(u, dtype=np.uint8) == 0xFF


def f32_to_e8m0(x: np.ndarray) -> np.ndarray:
    """Powers of two in [2^−127, 2^127] (or NaN) → E8M0 bytes; anything else is a caller bug → ValueError."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)
    ok = np.isnan(x) | ((m == 0.5) & (e - 1 >= -127) & (e - 1 <= 127))
    if not ok.all():
        raise ValueError(f"E8M0 holds only powers of two in [2^-127, 2^127]; got {x[~ok].ravel()[:4]}")
    return np.where(np.isnan(x), 255, e - 1 + 127).astype(np.uint8)


# ---------------------------------------------------------------------- e2m1 (FP4)
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def f32_to_e2m1(x: np.ndarray) -> np.ndarray:
    """Float values → e2m1 nibbles (uint8 0..15): RNE to the nearest representable, saturating at ±6.

    NaN has no e2m1 code, so it raises instead of silently becoming a number.
    """
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("e2m1 (FP4) cannot represent NaN")
    v = np.clip(_round_grid(x, 1, 0), -E2M1_MAX, E2M1_MAX)
    code = np.searchsorted(E2M1[:8].astype(np.float64), np.abs(v)).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 3)


def pack_fp4(nibbles: np.ndarray) -> np.ndarray:
    """[..., N] nibbles → [..., N/2] bytes; element 2k goes to the LOW nibble of byte k (checkpoint order)."""
    n = np.asarray(nibbles, dtype=np.uint8)
    if n.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got {n.shape}")
    return (n[..., 0::2] & 0xF) | ((n[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """[..., K] bytes → [..., 2K] nibbles (low nibble first)."""
    b = np.asarray(packed, dtype=np.uint8)
    return np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])


# ---------------------------------------------------------------------- quantized weights
@dataclass(frozen=True, eq=False)
class QuantWeight:
    """One linear weight as stored on disk, with its logical shape (out, in).

    fmt "fp8":   data uint8 e4m3 [out, in], scale [ceil(out/128), ceil(in/128)] (uint8 E8M0, or float32
                 for the -Base checkpoints' expert scales).
    fmt "fp4":   data uint8 packed e2m1 [out, in/2] (low nibble = even column), scale [out, in/32]
                 (uint8 E8M0 or float32).
    fmt "float": data as stored: uint16 raw bf16 words, or float16/float32/float64; scale None.
    `data` may be an np.memmap view of the checkpoint; nothing is decoded until `dequantize`.
    """

    fmt: str
    data: np.ndarray
    scale: np.ndarray | None
    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        m, n = self.shape
        if self.fmt == "fp8":
            want_data, want_scale = (m, n), (-(-m // FP8_BLOCK), -(-n // FP8_BLOCK))
        elif self.fmt == "fp4":
            if n % FP4_BLOCK:
                raise ValueError(f"fp4 weight needs in_features divisible by {FP4_BLOCK}, got {n}")
            want_data, want_scale = (m, n // 2), (m, n // FP4_BLOCK)
        elif self.fmt == "float":
            want_data, want_scale = (m, n), None
        else:
            raise ValueError(f"QuantWeight.fmt must be 'fp8', 'fp4' or 'float', got {self.fmt!r}")
        if tuple(self.data.shape) != want_data:
            raise ValueError(f"{self.fmt} weight of shape {self.shape} needs data {want_data}, got {self.data.shape}")
        if want_scale is None:
            if self.scale is not None or self.data.dtype not in (np.uint16, np.float16, np.float32, np.float64):
                raise ValueError(f"'float' weight takes no scale and uint16 (bf16) or float data, got {self.data.dtype}")
        else:
            if self.data.dtype != np.uint8:
                raise ValueError(f"{self.fmt} data must be raw uint8, got {self.data.dtype}")
            if self.scale is None or tuple(self.scale.shape) != want_scale:
                got = None if self.scale is None else self.scale.shape
                raise ValueError(f"{self.fmt} weight of shape {self.shape} needs scale {want_scale}, got {got}")
            if self.scale.dtype not in (np.uint8, np.float32):
                raise ValueError(f"scale must be uint8 (E8M0) or float32, got {self.scale.dtype}")

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        return dequantize(self, dtype)


def scale_f32(s: np.ndarray) -> np.ndarray:
    """Weight scales as float32: E8M0 bytes decoded, float32 scales as they are."""
    return e8m0_to_f32(s) if s.dtype == np.uint8 else np.asarray(s, dtype=np.float32)


def dequantize(w: QuantWeight, dtype=np.float32) -> np.ndarray:
    """Dense [out, in] array: fp8 W = e4m3(Wq)·S[m//128, n//128], fp4 W = e2m1(nibble)·S[m, n//32]."""
    m, n = w.shape
    if w.fmt == "float":
        d = np.asarray(w.data)
        return (bf16_to_f32(d) if d.dtype == np.uint16 else d).astype(dtype)
    s = scale_f32(np.asarray(w.scale))
    if w.fmt == "fp8":
        full = np.repeat(np.repeat(s, FP8_BLOCK, axis=0)[:m], FP8_BLOCK, axis=1)[:, :n]
        return (e4m3_to_f32(w.data) * full).astype(dtype)
    return (E2M1[unpack_fp4(w.data)] * np.repeat(s, FP4_BLOCK, axis=1)).astype(dtype)


def _pow2_scales(amax: np.ndarray, fmax: float) -> np.ndarray:
    """Per-block weight scales: smallest power of two ≥ amax/fmax (1 for all-zero blocks), within E8M0 range."""
    r = np.where(amax > 0, amax / fmax, 1.0)
    return np.ldexp(1.0, np.clip(_ceil_log2(r), -127, 127))


def quantize_fp8_block(w: np.ndarray, f32_scale: bool = False) -> QuantWeight:
    """[out, in] float → FP8 with one power-of-two scale per 128×128 block (E8M0, or float32 for -Base experts)."""
    w = np.asarray(w, dtype=np.float64)
    m, n = w.shape
    mb, nb = -(-m // FP8_BLOCK), -(-n // FP8_BLOCK)
    pad = np.zeros((mb * FP8_BLOCK, nb * FP8_BLOCK))
    pad[:m, :n] = np.abs(w)
    s = _pow2_scales(pad.reshape(mb, FP8_BLOCK, nb, FP8_BLOCK).max(axis=(1, 3)), E4M3_MAX)
    full = np.repeat(np.repeat(s, FP8_BLOCK, axis=0)[:m], FP8_BLOCK, axis=1)[:, :n]
    scale = s.astype(np.float32) if f32_scale else f32_to_e8m0(s)
    return QuantWeight("fp8", f32_to_e4m3(w / full), scale, (m, n))


def quantize_fp4(w: np.ndarray) -> QuantWeight:
    """[out, in] float → packed e2m1 with one power-of-two E8M0 scale per 32 consecutive inputs."""
    w = np.asarray(w, dtype=np.float64)
    m, n = w.shape
    if n % FP4_BLOCK:
        raise ValueError(f"fp4 weight needs in_features divisible by {FP4_BLOCK}, got {n}")
    s = _pow2_scales(np.abs(w).reshape(m, n // FP4_BLOCK, FP4_BLOCK).max(axis=2), E2M1_MAX)
    nib = f32_to_e2m1(w / np.repeat(s, FP4_BLOCK, axis=1))
    return QuantWeight("fp4", pack_fp4(nib), f32_to_e8m0(s), (m, n))


# ---------------------------------------------------------------------- official numerics emulation
def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"expected a float array, got {x.dtype}")
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the block {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _block_scales(x: np.ndarray, block: int, fmax: float, floor: float):
    """x viewed as [..., n/block, block] and its power-of-two scales [..., n/block, 1] (fp32 amax rule)."""
    xb = _blocks(x, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True).astype(np.float32)
    return xb, _pow2_ceil(np.maximum(amax, np.float32(floor)) * np.float32(1 / fmax))


def encode_fp8_blocks(x: np.ndarray, block: int = 64):
    """Values [..., n] → (e4m3 bytes [..., n], E8M0 scale bytes [..., n/block]): the deploy format of KV
    entries (model spec §5), with the scale rule of `act_fp8_round` (so decoding gives its values)."""
    xb, s = _block_scales(np.asarray(x), block, E4M3_MAX, 1e-4)
    codes = f32_to_e4m3(np.clip(xb / s, -E4M3_MAX, E4M3_MAX))
    return codes.reshape(np.shape(x)), f32_to_e8m0(s[..., 0])


def decode_fp8_blocks(codes: np.ndarray, scales: np.ndarray, block: int = 64) -> np.ndarray:
    v = e4m3_to_f32(codes).reshape(codes.shape[:-1] + (codes.shape[-1] // block, block))
    v = v * e8m0_to_f32(scales)[..., None]
    return v.reshape(codes.shape)


def encode_fp4_blocks(x: np.ndarray, block: int = 32):
    """Values [..., n] → (packed e2m1 bytes [..., n/2], E8M0 scale bytes [..., n/block]): the deploy
    format of indexer keys, with the scale rule of `act_fp4_round`."""
    xb, s = _block_scales(np.asarray(x), block, E2M1_MAX, E2M1_MAX * 2.0 ** -126)
    nib = f32_to_e2m1(np.clip(xb / s, -E2M1_MAX, E2M1_MAX)).reshape(np.shape(x))
    return pack_fp4(nib), f32_to_e8m0(s[..., 0])


def decode_fp4_blocks(packed: np.ndarray, scales: np.ndarray, block: int = 32) -> np.ndarray:
    v = E2M1[unpack_fp4(packed)]
    return (v.reshape(v.shape[:-1] + (v.shape[-1] // block, block)) * e8m0_to_f32(scales)[..., None]).reshape(v.shape)


def act_fp8_round(x: np.ndarray, block: int = 128) -> np.ndarray:
    """Quantize-dequantize through e4m3 in blocks along the last axis, as the official act_quant does.

    Scale (model spec §9.3, §11.3): fp32 max(amax, 1e-4) · fp32(1/448), rounded UP to a power of two
    via the exponent bits; x/s is clamped to ±448 and rounded to e4m3 (RNE).  Output keeps x's dtype.
    """
    x = np.asarray(x)
    xb, s = _block_scales(x, block, E4M3_MAX, 1e-4)
    y = _round_grid(np.clip(xb / s, -E4M3_MAX, E4M3_MAX), 3, -6) * s
    return y.reshape(x.shape).astype(x.dtype)


def act_fp4_round(x: np.ndarray, block: int = 32) -> np.ndarray:
    """Quantize-dequantize through e2m1 in blocks along the last axis (indexer q and keys, spec §9.3).

    Scale: fp32 max(amax, 6·2^−126) · fp32(1/6), rounded up to a power of two; values clamp to ±6.
    """
    x = np.asarray(x)
    xb, s = _block_scales(x, block, E2M1_MAX, E2M1_MAX * 2.0 ** -126)
    y = _round_grid(np.clip(xb / s, -E2M1_MAX, E2M1_MAX), 1, 0) * s
    return y.reshape(x.shape).astype(x.dtype)


def hadamard(n: int, dtype=np.float32) -> np.ndarray:
    """Normalized Sylvester–Hadamard matrix H_n / sqrt(n) (orthonormal, symmetric); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(dtype)

"""Per-sequence decoding state: fixed-capacity buffers plus one length (`start`) per sequence.

Why this layout: every buffer has a shape fixed by (batch, max_len), and every count the graph needs
(pending rows of the open block, entries visible to a query) is derived from `start`, so a decode step is
one static graph (mx.compile, CUDA graphs, ONNX state IO).  Per layer `L`:

* `L{L}.win`   [B, W, d]      the last W = sliding_window keys (K = V), oldest first; row r holds position
                              start − W + r (rows for negative positions are ignored by the graph).
* ratio > 0:   `L{L}.comp` [B, cap+1, d]   compressed entries j = 0..cap−1 (cap = max_len // m); the extra
                              last row absorbs masked writes so scatters need no data-dependent shapes.
               `L{L}.ckv`, `L{L}.cgate` [B, P, coff·d]  the last P projected rows of the compressor (kv, and
                              gate with `ape` added) in position order, P = m − 1 (HCA) or 2m − 1 (CSA: the
                              previous complete block's A-halves plus the open block).  Rows for negative
                              positions hold kv = 0, gate = −inf, which is exactly the empty "previous block"
                              of entry 0 (model spec §4.1), so a new state *is* the per-sequence reset.
* ratio == 4:  `L{L}.ikeys` [B, cap+1, c_idx] and `L{L}.ikv`, `L{L}.igate` [B, 2m−1, 2·c_idx] for the
                              indexer's own compressor.
* `start` [B] int64: tokens already processed per sequence.

The MTP block keeps its own state (`mtp_state_spec`): one window-only layer and its own `start`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple
    kind: str          # "act" (activation dtype), "hp" (fp32 compressor state) or "int"
    fill: float = 0.0  # initial value


def _layer_buffers(cfg: ModelConfig, layer: int, key: str, batch: int, max_len: int) -> list[Buffer]:
    d, m = cfg.head_dim, cfg.ratio(layer)
    out = [Buffer(f"{key}.win", (batch, cfg.sliding_window, d), "act")]
    if m:
        cap = max_len // m
        coff = 2 if m == 4 else 1
        p = 2 * m - 1 if m == 4 else m - 1
        out += [Buffer(f"{key}.comp", (batch, cap + 1, d), "act"),
                Buffer(f"{key}.ckv", (batch, p, coff * d), "hp"),
                Buffer(f"{key}.cgate", (batch, p, coff * d), "hp", float("-inf"))]
        if m == 4:
            c = cfg.index_head_dim
            out += [Buffer(f"{key}.ikeys", (batch, cap + 1, c), "act"),
                    Buffer(f"{key}.ikv", (batch, p, 2 * c), "hp"),
                    Buffer(f"{key}.igate", (batch, p, 2 * c), "hp", float("-inf"))]
    return out


def state_spec(cfg: ModelConfig, batch: int, max_len: int) -> list[Buffer]:
    """Buffers of the main model's state, in a stable order (also the ONNX state IO order)."""
    out = [Buffer("start", (batch,), "int")]
    for layer in range(cfg.num_hidden_layers):
        out += _layer_buffers(cfg, layer, f"L{layer}", batch, max_len)
    return out


def mtp_state_spec(cfg: ModelConfig, batch: int, max_len: int) -> list[Buffer]:
    return [Buffer("start", (batch,), "int")] + _layer_buffers(cfg, cfg.num_hidden_layers, "mtp", batch, max_len)


def new_state(ops, specs: list[Buffer]) -> dict:
    """Fresh state for a new sequence (this is the reset: nothing survives from an earlier sequence)."""
    st = {}
    for b in specs:
        if b.kind == "int":
            st[b.name] = ops.zeros(b.shape, "int")
        elif b.fill:
            st[b.name] = ops.hp(ops.full(b.shape, b.fill))
        else:
            z = ops.zeros(b.shape)
            st[b.name] = ops.hp(z) if b.kind == "hp" else ops.act(z)
    return st


# ---------------------------------------------------------------------- byte counts (model spec §5)
def _entry_bytes(width: int, rope: int, fmt: str, indexer: bool) -> float:
    """Bytes of one stored latent entry of `width` dims in storage format `fmt`."""
    if fmt == "bf16":
        return 2 * width
    if fmt != "deploy":
        raise ValueError(f"unknown state format {fmt!r}; use 'bf16' or 'deploy'")
    if indexer:                                   # FP4 e2m1 + one E8M0 scale per 32 values
        return width / 2 + math.ceil(width / 32)
    nope = width - rope                           # FP8 nope dims + E8M0 per 64, BF16 rope dims
    return nope + 2 * rope + math.ceil(nope / 64)


def state_bytes(cfg: ModelConfig, tokens: int, fmt: str = "bf16", include_window: bool = True,
                include_mtp: bool = False) -> int:
    """Bytes of one sequence's cache after `tokens` tokens in `fmt` ('bf16' or the paper's 'deploy' format:
    main entries FP8 nope + BF16 rope + E8M0 scales, indexer keys FP4 + E8M0).  Compressor pending rows
    are a constant fp32 overhead, included with the window."""
    d, r = cfg.head_dim, cfg.qk_rope_head_dim
    main = _entry_bytes(d, r, fmt, False)
    idx = _entry_bytes(cfg.index_head_dim, r, fmt, True)
    layers = list(range(cfg.num_hidden_layers)) + ([cfg.num_hidden_layers] if include_mtp else [])
    total = 0.0
    for layer in layers:
        m = cfg.ratio(layer)
        if include_window:
            total += min(tokens, cfg.sliding_window) * main
        if m:
            total += (tokens // m) * main
            if include_window:
                coff = 2 if m == 4 else 1
                p = 2 * m - 1 if m == 4 else m - 1
                total += 2 * p * coff * d * 4
        if m == 4:
            total += (tokens // m) * idx
            if include_window:
                total += 2 * 7 * 2 * cfg.index_head_dim * 4
    return int(math.ceil(total))


def bytes_per_token(cfg: ModelConfig, fmt: str = "bf16") -> float:
    """Asymptotic cache bytes per token (window and pending rows excluded), e.g. Flash 'deploy' ≈ 3,509."""
    d, r = cfg.head_dim, cfg.qk_rope_head_dim
    main = _entry_bytes(d, r, fmt, False)
    idx = _entry_bytes(cfg.index_head_dim, r, fmt, True)
    total = 0.0
    for layer in range(cfg.num_hidden_layers):
        m = cfg.ratio(layer)
        if m:
            total += main / m + (idx / m if m == 4 else 0.0)
    return total

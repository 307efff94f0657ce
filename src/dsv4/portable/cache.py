"""Per-sequence decoding state: one schema of named buffers, capacity that follows the tokens held, and
rows written in place.

Why this layout.  V4's state is tiny per token (model spec §5), so the runtime must never pay for the
*allocated* context:
* **Capacity follows use.**  Entry buffers are sized for `capacity` tokens, a bucket just above the tokens
  held (`capacity_for`: quarter-octave steps, so at most ~25 % slack and a few dozen distinct shapes up to
  1M for compiled steps).  The runner grows a state before a step that would overflow it (`State.reserve`,
  a copy of the rows held, amortized by the geometric buckets); `context` is only a limit.
* **Writes are in place.**  A step writes only its new rows (`Ops.write_rows`): the newest window key and
  compressor row of each layer, and an entry when a block completes.  The graph reads the old buffers and
  the step's new rows as separate segments and writes after all reads, so eager backends may overwrite
  in place, functional ones may donate, and an ONNX step may return just the rows.  A caller that needs
  an old state again forks it (`State.fork`, a copy proportional to the capacity).
* **Static shapes.**  Every shape derives from (batch, capacity); every count the graph needs derives from
  `start`, so a step is one static graph per capacity bucket (mx.compile, CUDA graphs, ONNX).

Buffers of layer `L` (key `L{L}`; the MTP block's one layer is `mtp`), each with batch first:
* `window`   [B, W+1, d]  ring of the last W = sliding_window keys (K = V): position t lives in row t % W.
* ratio m > 0 (`kv`, `gate`) [B, R+1, overlap·d] fp32 ring of the compressor's last R = overlap·m projected
  rows (`ModelConfig.pending_rows`; gate with `ape` added): the open block, plus for CSA the previous
  block whose A-halves the next entry pools (§4.5).  Position t lives in row t % R.
* ratio m > 0 `entries` [B, N+1, d], N = capacity // m: compressed entry j in row j.
* CSA `index.kv`, `index.gate`, `index.keys`: the same for the lightning indexer's own compressor (c_idx wide).
* `start` [B] int: tokens already processed per sequence.
The last row of every row buffer is a spill row: writes the graph skips (rows of a long chunk that leave
the ring again, blocks that do not complete) land there, so write shapes never depend on values.  Rows
for positions < 0 (and entries not yet complete) are never read, so a fresh state is all zeros.

Storage formats (`fmt`): "bf16" keeps entries in the activation dtype (bf16 in bfloat16 runs); "deploy"
keeps CSA/HCA entries as FP8 e4m3 nope dims + E8M0 scale per 64 + activation-dtype rope dims, and indexer
keys as packed FP4 e2m1 + E8M0 per 32 (model spec §5; `EntryStore`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig

FORMATS = ("bf16", "deploy")
MIN_CAPACITY = 128           # smallest bucket (tokens); a multiple of every compress ratio
FP8_BLOCK, FP4_BLOCK = 64, 32


def capacity_for(tokens: int, limit: int | None = None) -> int:
    """The capacity bucket for `tokens` tokens: a multiple of step = max(128, 2^(⌊log2 tokens⌋ − 2)),
    so consecutive buckets differ by ≤ 25 %; clipped to `limit` (the model's context) when given."""
    n = max(int(tokens), 1)
    step = max(MIN_CAPACITY, 1 << max(n.bit_length() - 3, 0))
    cap = -(-n // step) * step
    return min(cap, limit) if limit else cap


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple
    kind: str              # "act" (activation dtype), "hp" (fp32 compressor rows), "int", "u8" (codes/scales)
    grows: bool = False    # rows follow the capacity (entry buffers), else fixed size


def _entry_parts(name: str, batch: int, rows: int, width: int, rope: int, fmt: str, indexer: bool) -> list:
    if fmt == "bf16":
        return [Buffer(name, (batch, rows, width), "act", True)]
    if indexer:            # FP4: two values per byte, one E8M0 scale per 32
        return [Buffer(name + ".fp4", (batch, rows, width // 2), "u8", True),
                Buffer(name + ".scale", (batch, rows, width // FP4_BLOCK), "u8", True)]
    nope = width - rope
    return [Buffer(name + ".nope", (batch, rows, nope), "u8", True),
            Buffer(name + ".scale", (batch, rows, nope // FP8_BLOCK), "u8", True),
            Buffer(name + ".rope", (batch, rows, rope), "act", True)]


def _layer_buffers(cfg: ModelConfig, layer: int, key: str, batch: int, capacity: int, fmt: str) -> list:
    d, m, r = cfg.head_dim, cfg.ratio(layer), cfg.qk_rope_head_dim
    out = [Buffer(f"{key}.window", (batch, cfg.sliding_window + 1, d), "act")]
    if m:
        p, width = cfg.pending_rows(layer) + 1, cfg.overlap(layer)
        n = cfg.entries_capacity(layer, capacity) + 1
        out += [Buffer(f"{key}.kv", (batch, p, width * d), "hp"), Buffer(f"{key}.gate", (batch, p, width * d), "hp")]
        out += _entry_parts(f"{key}.entries", batch, n, d, r, fmt, False)
        if cfg.is_csa(layer):
            c = cfg.index_head_dim
            out += [Buffer(f"{key}.index.kv", (batch, p, width * c), "hp"),
                    Buffer(f"{key}.index.gate", (batch, p, width * c), "hp")]
            out += _entry_parts(f"{key}.index.keys", batch, n, c, r, fmt, True)
    return out


def deploy_fits(cfg: ModelConfig) -> bool:
    """Whether the deploy format's blocks tile this config's entries: FP8 scales per 64 nope dims, FP4
    scales per 32 indexer dims (V4 as released: 448 nope, 128 indexer dims)."""
    return (cfg.head_dim - cfg.qk_rope_head_dim) % FP8_BLOCK == 0 and cfg.index_head_dim % FP4_BLOCK == 0


def check_format(fmt: str, cfg: ModelConfig | None = None) -> None:
    """Refuse a state format other than "bf16" and "deploy", and "deploy" for a config whose entries its
    blocks do not tile (one message for the API and the schema)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown state format {fmt!r}; use 'bf16' or 'deploy'")
    if fmt == "deploy" and cfg is not None and not deploy_fits(cfg):
        raise ValueError(f"the deploy state format stores {FP8_BLOCK}-dim FP8 and {FP4_BLOCK}-dim FP4 blocks; "
                         f"this model's entries ({cfg.head_dim - cfg.qk_rope_head_dim} nope dims, "
                         f"{cfg.index_head_dim} indexer dims) do not divide into them: use state_format 'bf16'")


def state_spec(cfg: ModelConfig, batch: int, capacity: int, fmt: str = "bf16") -> list[Buffer]:
    """Buffers of the main model's state, in a stable order (also the ONNX state IO order)."""
    check_format(fmt)
    out = [Buffer("start", (batch,), "int")]
    for layer in range(cfg.num_hidden_layers):
        out += _layer_buffers(cfg, layer, f"L{layer}", batch, capacity, fmt)
    return out


def mtp_state_spec(cfg: ModelConfig, batch: int, capacity: int, fmt: str = "bf16") -> list[Buffer]:
    check_format(fmt)
    return [Buffer("start", (batch,), "int")] + _layer_buffers(cfg, cfg.num_hidden_layers, "mtp", batch,
                                                               capacity, fmt)


def spec_for(cfg: ModelConfig, batch: int, capacity: int, fmt: str = "bf16", mtp: bool = False) -> list[Buffer]:
    """The buffers of the main model's state, or of the MTP block's (`mtp`)."""
    return (mtp_state_spec if mtp else state_spec)(cfg, batch, capacity, fmt)


# ---------------------------------------------------------------------- the state object and its views
class EntryStore:
    """Compressed entries (or indexer keys) of one layer in the state's storage format.

    Reads decode only what they return: `rows(idx)` the gathered rows, `prefix(count)` the rows a query
    can see (eager backends trim to the visible rows, `Ops.trim`).  `rounded(e)` is the value a row decodes
    to once stored, so a step that attends to its own new entries sees exactly what later steps read."""

    def __init__(self, state: "State", name: str, rope: int, indexer: bool):
        self.state, self.name, self.rope, self.indexer = state, name, rope, indexer
        self.deploy = state.fmt == "deploy"
        parts = ((".fp4", ".scale") if indexer else (".nope", ".scale", ".rope")) if self.deploy else ("",)
        self.names = [name + p for p in parts]

    def _parts(self):
        return [self.state.buffers[n] for n in self.names]

    def _decode(self, o, parts):
        if not self.deploy:
            return o.read(parts[0])
        if self.indexer:
            return o.decode_fp4(parts[0], parts[1], FP4_BLOCK)
        return o.concat([o.decode_fp8(parts[0], parts[1], FP8_BLOCK), o.read(parts[2])], -1)

    def rows(self, o, idx):
        """Decoded rows idx [B,M] (negative indices read row 0; callers mask them)."""
        safe = o.maximum(idx, 0)
        return self._decode(o, [o.gather_rows(p, safe) for p in self._parts()])

    def prefix(self, o, count):
        """Decoded rows 0..max(count)−1 at least (all rows on traced backends)."""
        return self._decode(o, [o.trim(p, count) for p in self._parts()])

    def rounded(self, o, e):
        if not self.deploy:
            return e
        if self.indexer:
            return o.decode_fp4(*o.encode_fp4(e, FP4_BLOCK), FP4_BLOCK)
        nope = e.shape[-1] - self.rope
        return o.concat([o.decode_fp8(*o.encode_fp8(e[..., :nope], FP8_BLOCK), FP8_BLOCK), e[..., nope:]], -1)

    def write(self, o, dest, e):
        """Store rows e [B,M,c] (already `rounded`) at rows dest [B,M]."""
        if not self.deploy:
            vals = [e]
        elif self.indexer:
            vals = list(o.encode_fp4(e, FP4_BLOCK))
        else:
            nope = e.shape[-1] - self.rope
            vals = list(o.encode_fp8(e[..., :nope], FP8_BLOCK)) + [e[..., nope:]]
        bufs = self.state.buffers
        for n, v in zip(self.names, vals):
            bufs[n] = o.write_rows(bufs[n], dest, v)


class LayerState:
    """Named view of one layer's buffers (`window`, `kv`, `gate`, `entries`, and for CSA `index_kv`,
    `index_gate`, `index_keys`); assigning an attribute replaces that buffer in the state."""

    _FIELDS = {"window": "window", "kv": "kv", "gate": "gate", "index_kv": "index.kv", "index_gate": "index.gate"}

    def __init__(self, state: "State", cfg: ModelConfig, layer: int, key: str):
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_key", key)
        m = cfg.ratio(layer)
        r = cfg.qk_rope_head_dim
        object.__setattr__(self, "entries", EntryStore(state, f"{key}.entries", r, False) if m else None)
        object.__setattr__(self, "index_keys",
                           EntryStore(state, f"{key}.index.keys", r, True) if cfg.is_csa(layer) else None)

    def __getattr__(self, field):
        if field not in LayerState._FIELDS:
            raise AttributeError(field)
        return self._state.buffers[f"{self._key}.{LayerState._FIELDS[field]}"]

    def __setattr__(self, field, value):
        self._state.buffers[f"{self._key}.{LayerState._FIELDS[field]}"] = value


class State:
    """A batch of sequences' state: flat buffers by name (the names `state_spec` gives, which are also the
    ONNX IO names), the storage format and the capacity in tokens they are sized for.  A step updates a
    state in place; `fork` gives an independent copy."""

    def __init__(self, cfg: ModelConfig, buffers: dict, capacity: int, fmt: str, mtp: bool = False):
        self.cfg, self.buffers = cfg, buffers
        self.capacity, self.fmt, self.mtp = capacity, fmt, mtp

    @classmethod
    def new(cls, o, cfg: ModelConfig, batch: int, capacity: int, fmt: str = "bf16", mtp: bool = False):
        """A fresh state (all zeros: this is the per-sequence reset, nothing survives an earlier sequence)."""
        bufs = {b.name: o.state_buffer(b.shape, b.kind) for b in spec_for(cfg, batch, capacity, fmt, mtp)}
        return cls(cfg, bufs, capacity, fmt, mtp)

    # ------------------------------------------------------------------ access
    @property
    def start(self):
        return self.buffers["start"]

    @start.setter
    def start(self, value):
        self.buffers["start"] = value

    @property
    def batch(self) -> int:
        return self.buffers["start"].shape[0]

    @property
    def specs(self) -> list:
        """The `Buffer`s of this state's batch, capacity and format (`spec_for`)."""
        return spec_for(self.cfg, self.batch, self.capacity, self.fmt, self.mtp)

    def layer(self, layer: int) -> LayerState:
        return LayerState(self, self.cfg, layer, "mtp" if self.mtp else f"L{layer}")

    def __getitem__(self, name):
        return self.buffers[name]

    def keys(self):
        return self.buffers.keys()

    def items(self):
        return self.buffers.items()

    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.buffers.values())

    # ------------------------------------------------------------------ lifetime
    def fork(self, o) -> "State":
        """An independent copy: the parent and the fork evolve separately (cost ∝ capacity ≈ tokens held)."""
        return State(self.cfg, {k: o.copy(v) for k, v in self.buffers.items()}, self.capacity, self.fmt, self.mtp)

    def reserve(self, o, tokens: int, limit: int | None = None) -> None:
        """Grow the entry buffers (in this object) so `tokens` tokens fit; a no-op when they already do."""
        if tokens <= self.capacity:
            return
        self.resize(o, capacity_for(tokens, limit))

    def resize(self, o, capacity: int) -> None:
        """Re-size the entry buffers to `capacity` tokens, keeping every row held (capacity ≥ tokens held)."""
        if capacity == self.capacity:
            return
        for b in spec_for(self.cfg, self.batch, capacity, self.fmt, self.mtp):
            old = self.buffers[b.name]
            if b.grows and old.shape[1] != b.shape[1]:
                keep = min(old.shape[1], b.shape[1]) - 1                     # rows without the spill row
                pad = o.state_buffer((b.shape[0], b.shape[1] - keep) + tuple(b.shape[2:]), b.kind)
                self.buffers[b.name] = o.concat([old[:, :keep], pad], 1)
        self.capacity = capacity


def stack(o, states: list) -> State:
    """One batched state from batch-1 states (grown to the largest capacity first)."""
    cap = max(s.capacity for s in states)
    for s in states:
        s.resize(o, cap)
    first = states[0]
    bufs = {k: o.concat([s.buffers[k] for s in states], 0) for k in first.buffers}
    return State(first.cfg, bufs, cap, first.fmt, first.mtp)


def split(o, state: State) -> list:
    """Batch-1 states from a batched one (each an independent copy)."""
    return [State(state.cfg, {k: o.copy(v[i:i + 1]) for k, v in state.buffers.items()}, state.capacity,
                  state.fmt, state.mtp) for i in range(state.batch)]


# ---------------------------------------------------------------------- byte counts (model spec §5)
def _entry_bytes(width: int, rope: int, fmt: str, indexer: bool) -> float:
    """Bytes of one stored latent entry of `width` dims in storage format `fmt`."""
    check_format(fmt)
    if fmt == "bf16":
        return 2 * width
    if indexer:                                   # FP4 e2m1 + one E8M0 scale per 32 values
        return width / 2 + math.ceil(width / FP4_BLOCK)
    nope = width - rope                           # FP8 nope dims + E8M0 per 64, BF16 rope dims
    return nope + 2 * rope + math.ceil(nope / FP8_BLOCK)


def state_bytes(cfg: ModelConfig, tokens: int, fmt: str = "bf16", include_window: bool = True,
                include_mtp: bool = False) -> int:
    """Bytes of one sequence's cache after `tokens` tokens in `fmt` ('bf16' or the paper's 'deploy' format:
    main entries FP8 nope + BF16 rope + E8M0 scales, indexer keys FP4 + E8M0).  The window ring and the
    compressor's pending rows (fp32) are a constant overhead, included with the window."""
    d, r = cfg.head_dim, cfg.qk_rope_head_dim
    main = _entry_bytes(d, r, fmt, False)
    idx = _entry_bytes(cfg.index_head_dim, r, fmt, True)
    layers = list(range(cfg.num_hidden_layers)) + ([cfg.num_hidden_layers] if include_mtp else [])
    total = 0.0
    for layer in layers:
        m = cfg.ratio(layer)
        if include_window:
            total += min(tokens, cfg.sliding_window) * 2 * d
        if m:
            total += (tokens // m) * main
            if include_window:
                total += 2 * cfg.pending_rows(layer) * cfg.overlap(layer) * d * 4
        if cfg.is_csa(layer):
            total += (tokens // m) * idx
            if include_window:
                total += 2 * cfg.pending_rows(layer) * cfg.overlap(layer) * cfg.index_head_dim * 4
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
            total += main / m + (idx / m if cfg.is_csa(layer) else 0.0)
    return total

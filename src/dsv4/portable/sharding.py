"""How V4 splits across N ranks (tensor + expert parallel), derived from the config alone.

Why this split (the official inference code's, and vLLM's for TP): V4's KV is one shared latent per
token, so attention parallelizes over query heads without splitting the state; the output projection is
grouped, so whole `wo_a` groups go with their heads and `wo_b` becomes row-parallel (one all-reduce);
the routed experts are independent, so each rank holds E/N of them (expert parallel) and one all-reduce
combines a MoE layer's routed and shared outputs.  Per rank:

* split by rows (the output axis) — `wq_b` and `attn_sink` by query heads, `wo_a` by groups, the
  indexer's `wq_b` and `weights_proj` by indexer heads, the shared expert's `w1`/`w3` by its hidden
  units, `embed` and `head` by vocabulary;
* split by columns (the input axis) — `wo_b` (its input is the groups' outputs) and the shared `w2`;
* the rank's own E/N routed experts, whole;
* replicated — everything else: mHC, norms, `wq_a`, `wkv`, the compressors, the router, the MTP
  projections, and the state (window, entries, indexer keys): every rank holds the same state.

Collectives per layer (what the graph inserts, `Ops.all_reduce` / `Ops.all_gather`): attention output
after `wo_b`; the indexer's head-weighted scores before top-k (so every rank selects the same entries:
the sum is one all-reduce result, identical on every rank, and ties still go to the lower index); the
MoE combine; plus the embedding (a masked lookup summed) and the head's logits (gathered by vocabulary).
Everything between collectives is either replicated (same inputs, same code: same values) or
rank-local, so no rank ever needs another's state.

FP8 weights are split only where their 128×128 scale blocks allow it (a part starts on a block edge or
lies inside one block), so a rank's part is again a valid FP8 block-scaled weight, kept quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .checkpoint import EXPERTS, NP_DTYPE, TensorSpec, weight_schema
from .config import ModelConfig
from .quant import FP8_BLOCK

ROWS, COLS = 0, 1

# (name suffix, axis, what the axis counts) for every split tensor; the rest is replicated.
_SPLIT = (("attn.wq_b", ROWS, "heads"), ("attn.attn_sink", ROWS, "heads"), ("attn.wo_a", ROWS, "groups"),
          ("attn.wo_b", COLS, "groups"), ("indexer.wq_b", ROWS, "index heads"),
          ("indexer.weights_proj", ROWS, "index heads"), ("shared_experts.w1", ROWS, "shared hidden units"),
          ("shared_experts.w3", ROWS, "shared hidden units"), ("shared_experts.w2", COLS, "shared hidden units"))
_VOCAB = ("embed.weight", "head.weight")


class ShardingError(ValueError):
    """The model cannot be split over this many ranks; the message names the size that does not divide."""


@dataclass(frozen=True)
class Part:
    """A rank's part of one stored tensor: rows (axis 0) or columns (axis 1) start..stop."""
    axis: int
    start: int
    stop: int

    def shape(self, full: tuple) -> tuple:
        s = list(full)
        s[self.axis] = self.stop - self.start
        return tuple(s)


def _tensor_key(name: str) -> tuple[str, str]:
    """(`prefix`, `weight`|`scale`|'') of a stored tensor name."""
    for tail in (".weight", ".scale"):
        if name.endswith(tail):
            return name[:-len(tail)], tail[1:]
    return name, ""


class RankShard:
    """What rank `rank` of `world` holds of `cfg`: its local head/group/expert/vocab counts and ranges,
    and `part(name)` for each stored tensor (None: the whole tensor)."""

    def __init__(self, cfg: ModelConfig, rank: int, world: int):
        if not 0 <= rank < world:
            raise ShardingError(f"rank {rank} is outside a world of {world}")
        self.cfg, self.rank, self.world = cfg, rank, world
        sizes = {"heads": cfg.num_attention_heads, "groups": cfg.o_groups, "index heads": cfg.index_n_heads,
                 "routed experts": cfg.n_routed_experts, "shared hidden units": cfg.moe_intermediate_size,
                 "vocabulary entries": cfg.vocab_size}
        for what, n in sizes.items():
            if n % world:
                raise ShardingError(f"cannot split the model over {world} ranks: its {n} {what} do not divide "
                                    f"by {world}")
        self.sizes = {k: v // world for k, v in sizes.items()}
        self.heads, self.groups = self.sizes["heads"], self.sizes["groups"]
        self.index_heads = self.sizes["index heads"]
        e = self.sizes["routed experts"]
        self.experts = range(rank * e, (rank + 1) * e)
        v = self.sizes["vocabulary entries"]
        self.vocab = range(rank * v, (rank + 1) * v)
        self._check_blocks()

    def _units(self, axis_len: int) -> Part:
        """This rank's 1/world of an axis of `axis_len` (whole heads, groups, units: the sizes divide)."""
        n = axis_len // self.world
        return Part(0, self.rank * n, (self.rank + 1) * n)

    def part(self, name: str, shape: tuple) -> Part | None:
        """This rank's part of the stored tensor `name` (full shape `shape`), None when it holds it whole."""
        if self.world == 1:
            return None
        prefix, kind = _tensor_key(name)
        if name in _VOCAB:
            return self._units(shape[0])
        for suffix, axis, _ in _SPLIT:
            if not prefix.endswith(suffix):
                continue
            if kind == "scale":                           # the 128-blocks of the weight's part
                w = self._units(self._weight_len(prefix, axis))
                return Part(axis, w.start // FP8_BLOCK, -(-w.stop // FP8_BLOCK))
            p = self._units(shape[axis])
            return Part(axis, p.start, p.stop)
        return None

    def _weight_len(self, prefix: str, axis: int) -> int:
        return weight_schema(self.cfg)[prefix + ".weight"].tensors[0].shape[axis]

    def _check_blocks(self) -> None:
        """Every split FP8 weight's part starts on a scale-block edge or lies inside one block."""
        if self.world == 1:
            return
        for entry in weight_schema(self.cfg).values():
            for t in entry.tensors:
                if t.dtype != "F8_E4M3" or entry.role == EXPERTS:
                    continue
                p = self.part(t.name, t.shape)
                if p is None:
                    continue
                for r in range(self.world):
                    a, b = r * (p.stop - p.start), (r + 1) * (p.stop - p.start)
                    if a % FP8_BLOCK and a // FP8_BLOCK != (b - 1) // FP8_BLOCK:
                        raise ShardingError(f"cannot split {t.name} {list(t.shape)} over {self.world} ranks: "
                                            f"a part of {b - a} {'rows' if p.axis == ROWS else 'columns'} "
                                            f"would cross its {FP8_BLOCK}-wide FP8 scale blocks")

    def holds_expert(self, name: str) -> bool:
        """Whether a routed expert's tensor (`…experts.E.w1.weight`) is one of this rank's."""
        e = int(name.split("experts.")[1].split(".")[0])
        return e in self.experts

    def spec(self, t: TensorSpec) -> TensorSpec:
        p = self.part(t.name, t.shape)
        return t if p is None else TensorSpec(t.name, t.dtype, p.shape(t.shape))


_SHARDS: dict = {}


def shard(cfg: ModelConfig, rank: int = 0, world: int = 1) -> RankShard:
    """The `RankShard` of rank `rank` of `world` for `cfg`, built once (the graph asks for it every step)."""
    key = (repr(cfg), rank, world)
    if key not in _SHARDS:
        _SHARDS[key] = RankShard(cfg, rank, world)
    return _SHARDS[key]


# ---------------------------------------------------------------------- memory and communication plans
@dataclass(frozen=True)
class MemoryPlan:
    """Stored weight bytes one rank reads: `split` (its parts of the split tensors and its experts) and
    `replicated` (what every rank holds whole); `total` is what a single process holds."""
    world: int
    split: int
    replicated: int
    total: int

    @property
    def per_rank(self) -> int:
        return self.split + self.replicated


def memory_plan(cfg: ModelConfig, world: int, rank: int = 0) -> MemoryPlan:
    """Stored bytes of rank `rank`'s weights (every rank's are equal: the parts are equal slices)."""
    sh = shard(cfg, rank, world)
    split = replicated = total = 0
    for entry in weight_schema(cfg).values():
        for t in entry.tensors:
            total += t.nbytes
            if entry.role == EXPERTS:
                split += t.nbytes if (world == 1 or sh.holds_expert(t.name)) else 0
                continue
            p = sh.part(t.name, t.shape)
            if p is None:
                replicated += t.nbytes
            else:
                split += math.prod(p.shape(t.shape)) * NP_DTYPE[t.dtype].itemsize
    if world == 1:
        split, replicated = 0, total
    return MemoryPlan(world, split, replicated, total)


def collectives_per_token(cfg: ModelConfig, world: int, entries: int = 0, itemsize: int = 4) -> dict:
    """The collectives of one token's forward (main model, no MTP) on each rank: the values all-reduced
    and all-gathered, the bytes a rank contributes to them (`contributed_bytes`: an all-reduce's whole
    vector, its own part of an all-gather — what `Comm.sent` counts) and the bytes a ring algorithm
    sends per rank (`bytes_sent`: 2(N−1)/N × an all-reduced vector, (N−1)/N × a gathered one).
    `entries` is how many indexer scores a query has per CSA layer (the visible compressed entries plus
    the chunk's own candidates), `itemsize` the compute dtype's bytes.

    Per layer: attention out (hidden_size) + MoE combine (hidden_size) all-reduced, + on CSA layers the
    indexer scores (two segments: stored and new entries); per token: the embedding (hidden_size)
    all-reduced and the logits (vocab_size) gathered."""
    d = cfg.hidden_size
    layers = cfg.num_hidden_layers
    csa = sum(cfg.is_csa(i) for i in range(layers))
    reduce_vals = 2 * d * layers + d + csa * entries
    gather_vals = cfg.vocab_size
    out = {"all_reduce_values": reduce_vals, "all_gather_values": gather_vals, "collectives": 0,
           "contributed_bytes": 0, "bytes_sent": 0}
    if world > 1:
        out.update(collectives=2 * layers + 2 * csa + 2,
                   contributed_bytes=int((reduce_vals + gather_vals / world) * itemsize),
                   bytes_sent=int((2 * (world - 1) / world * reduce_vals + (world - 1) / world * gather_vals)
                                  * itemsize))
    return out

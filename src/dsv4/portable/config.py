"""Model configuration: one `ModelConfig` read from an HF-style `config.json`.

Why a dataclass of our own instead of a dict: every size the graph, the cache and the checkpoint schema
need is derived here once, and every bad field is rejected here with one clear message, so nothing
downstream meets a config it cannot run.  Key names are the HF `config.json` names (model spec §1.1).
Presets: `flash`, `pro` (the released models), `tiny` (model spec §11.1), `tiny2` (a second small
config with other sizes: HCA first like Pro, 8 heads, 16 experts top-4, hidden 384), `demo` (the shipped
model trained on arithmetic: hidden 128, 4 layers, the real 129,280-token vocabulary) and `demo-random`
(tiny with the real vocabulary and random weights, for tests).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

WINDOW, CSA, HCA = "window", "csa", "hca"
_KIND = {0: WINDOW, 4: CSA, 128: HCA}


class ConfigError(ValueError):
    """A config.json field that V4 cannot run with; the message names the field."""


def _yarn_default():
    return {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
            "beta_fast": 32, "beta_slow": 1}


def _quant_default():
    return {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
            "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What each ModelConfig annotation accepts from JSON, and how an error names it.
_TYPES = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple": (lambda v: isinstance(v, tuple) and all(_is_int(r) for r in v), "a list of integers"),
    "dict | None": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}
_JSON_KIND = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
              tuple: "a list", dict: "an object"}


def _describe(v) -> str:
    """A JSON value as an error names it: its kind and a repr short enough for one line."""
    if v is None:
        return "null"
    return f"{_JSON_KIND.get(type(v), type(v).__name__)} {reprlib.repr(v)}"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    compress_ratios: tuple = ()
    num_hash_layers: int = 3
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = field(default_factory=_yarn_default)
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    expert_dtype: str = "fp4"
    quantization_config: dict | None = field(default_factory=_quant_default)
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    model_type: str = "deepseek_v4"
    encoding: str = "dsv4-2604"   # chat-encoder variant (effort table); see portable/encoding

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config of an HF-style dict (unknown keys ignored), validated (`validate`)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a JSON object, got {_describe(d)}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if isinstance(kw.get("compress_ratios"), list):
            kw["compress_ratios"] = tuple(kw["compress_ratios"])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"no config.json at {p}")
        try:
            text = p.read_bytes().decode("utf-8")
            d = json.loads(text)
        except OSError as e:
            raise ConfigError(f"{p}: cannot be read ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{p}: JSON nested too deeply to be a config") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: holds {_describe(d)}, not a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        return d

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise a ConfigError naming the first bad field.  Types are checked before any value, so a wrong
        type gets its own message instead of failing inside a later check or a formula."""
        def bad(name, why):
            raise ConfigError(f"config field '{name}': {why}")

        for f in fields(self):
            ok, words = _TYPES[f.type]
            value = getattr(self, f.name)
            if not ok(value):
                bad(f.name, f"expected {words}, got {_describe(value)}")
        if self.model_type != "deepseek_v4":
            bad("model_type", f"expected 'deepseek_v4', got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters",
                     "max_position_embeddings", "index_n_heads", "index_head_dim", "index_topk"):
            if getattr(self, name) <= 0:
                bad(name, f"must be a positive integer, got {getattr(self, name)}")
        n_ratios = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != n_ratios:
            bad("compress_ratios", f"needs num_hidden_layers + num_nextn_predict_layers = {n_ratios} "
                f"entries, got {len(self.compress_ratios)}")
        for i, r in enumerate(self.compress_ratios):
            if r not in _KIND:
                bad("compress_ratios", f"entry {i} is {r!r}; V4 supports only 0 (window), 4 (CSA), 128 (HCA)")
        if self.num_key_value_heads != 1:
            bad("num_key_value_heads", f"V4 uses one shared K=V head, got {self.num_key_value_heads}")
        if self.n_shared_experts != 1:
            bad("n_shared_experts", f"V4 has exactly one shared expert, got {self.n_shared_experts}")
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", f"must be 0 or 1, got {self.num_nextn_predict_layers}")
        r = self.qk_rope_head_dim
        if r % 2 or r <= 0 or r > self.head_dim:
            bad("qk_rope_head_dim", f"must be even and ≤ head_dim ({self.head_dim}), got {r}")
        if r > self.index_head_dim:
            bad("qk_rope_head_dim", f"must be ≤ index_head_dim ({self.index_head_dim}), got {r}")
        if self.num_attention_heads % self.o_groups:
            bad("o_groups", f"{self.o_groups} does not divide num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"{self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            bad("num_hash_layers", f"must be in 0..num_hidden_layers, got {self.num_hash_layers}")
        if self.scoring_func != "sqrtsoftplus":
            bad("scoring_func", f"V4 routes with 'sqrtsoftplus', got {self.scoring_func!r}")
        if self.expert_dtype not in ("fp4", "fp8"):
            bad("expert_dtype", f"must be 'fp4' or 'fp8', got {self.expert_dtype!r}")
        if self.expert_dtype == "fp4" and (self.hidden_size % 32 or self.moe_intermediate_size % 32):
            bad("moe_intermediate_size", "FP4 experts need hidden_size and moe_intermediate_size divisible by 32")
        for name, low in (("rope_theta", 1), ("compress_rope_theta", 1), ("rms_norm_eps", 0), ("hc_eps", 0),
                          ("routed_scaling_factor", 0), ("swiglu_limit", 0)):   # YaRN divides by log(theta)
            v = getattr(self, name)
            if not math.isfinite(v) or v <= low:
                bad(name, f"must be a finite number > {low}, got {v!r}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                bad(name, f"must be a token id in 0..vocab_size-1 ({self.vocab_size - 1}), got {getattr(self, name)}")
        rs = self.rope_scaling or {}
        if rs and rs.get("type", rs.get("rope_type")) != "yarn":
            bad("rope_scaling", f"only YaRN scaling is defined for V4, got {_describe(rs)}")
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
            v = rs.get(key, 1)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                bad("rope_scaling", f"'{key}' must be a finite number > 0, got {_describe(v)}")
        if self.quantization_config is not None:
            bs = self.quantization_config.get("weight_block_size", [128, 128])
            if not isinstance(bs, (list, tuple)) or list(bs) != [128, 128]:
                bad("quantization_config", f"weight_block_size must be [128, 128], got {_describe(bs)}")
        if self.encoding not in ("dsv4-2604", "dsv4-0731"):
            bad("encoding", f"must be 'dsv4-2604' or 'dsv4-0731', got {self.encoding!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_layers_total(self) -> int:
        """Main layers plus the MTP block (which is layer index num_hidden_layers)."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def kind(self, layer: int) -> str:
        return _KIND[self.compress_ratios[layer]]

    def hash_routed(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    @property
    def hc_mix(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def yarn(self) -> dict:
        return self.rope_scaling or {}

    def is_csa(self, layer: int) -> bool:
        """Compressed Sparse Attention: ratio 4, overlapping blocks, a lightning indexer."""
        return self.compress_ratios[layer] == 4

    def overlap(self, layer: int) -> int:
        """Halves each compressor row carries: 2 for CSA (A feeds the next block, B its own), else 1 (§4.1)."""
        return 2 if self.is_csa(layer) else 1

    def pending_rows(self, layer: int) -> int:
        """Projected compressor rows a layer must keep between steps: the open block, plus the previous
        block's A-halves for CSA (model spec §4.5); 0 for window-only layers."""
        return self.overlap(layer) * self.ratio(layer)

    def entries_capacity(self, layer: int, tokens: int) -> int:
        """Compressed entries `tokens` tokens can complete (0 for window-only layers)."""
        r = self.ratio(layer)
        return tokens // r if r else 0

    def param_counts(self) -> dict:
        """Total and per-token-active parameter counts of the main model and of the MTP block (id tables
        and scales are not parameters)."""
        from .checkpoint import EXPERTS, LINEAR, TABLE, weight_schema  # local import: schema depends on config
        from .weights import dense_elements, instance
        total = active = mtp = 0
        k, e = self.num_experts_per_tok, self.n_routed_experts
        for entry in weight_schema(self).values():
            if entry.role == TABLE:
                continue
            tensors, times = instance(entry)
            n = times * (dense_elements(tensors) if entry.role in (LINEAR, EXPERTS)
                         else sum(math.prod(t.shape) for t in tensors))
            if entry.name.startswith("mtp."):
                mtp += n
                continue
            total += n
            active += n * k // e if entry.role == EXPERTS else n
        return {"total": total, "active": active, "mtp": mtp}


# ---------------------------------------------------------------------- presets
def _flash() -> dict:
    return dict(hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024, o_groups=8,
                compress_ratios=[0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0],
                index_topk=512, n_routed_experts=256, moe_intermediate_size=2048, routed_scaling_factor=1.5)


def _pro() -> dict:
    return dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
                compress_ratios=[128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)] + [0],
                index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5)


def _tiny() -> dict:
    return dict(vocab_size=1024, hidden_size=256, num_hidden_layers=6, compress_ratios=[0, 4, 128, 4, 128, 0, 0],
                num_attention_heads=4, head_dim=128, q_lora_rank=128, o_groups=2, o_lora_rank=128,
                index_n_heads=16, index_topk=4, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=128, max_position_embeddings=4096)


def _tiny2() -> dict:
    return dict(vocab_size=1024, hidden_size=384, num_hidden_layers=5, compress_ratios=[128, 4, 0, 4, 128, 0],
                num_hash_layers=2, num_attention_heads=8, head_dim=128, q_lora_rank=256, o_groups=4,
                o_lora_rank=128, index_n_heads=16, index_topk=6, n_routed_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=256, routed_scaling_factor=2.5, max_position_embeddings=2048)


def _demo() -> dict:
    """The shipped demo (trained by tools/train_demo.py): every V4 mechanism (window, CSA and HCA layers,
    mHC, hash-routed and top-k MoE, MTP) at a size a laptop CPU trains, with the real vocabulary."""
    return dict(vocab_size=129280, hidden_size=128, num_hidden_layers=4, compress_ratios=[0, 4, 128, 0, 0],
                num_hash_layers=1, num_attention_heads=4, head_dim=64, qk_rope_head_dim=32, q_lora_rank=64,
                o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=64, index_topk=8,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                max_position_embeddings=4096)


def _demo_random() -> dict:
    """The tiny architecture with the real V4 vocabulary and random weights (tests: long outputs, no EOS)."""
    return dict(_tiny(), vocab_size=129280, max_position_embeddings=8192)


PRESETS = {"flash": _flash, "pro": _pro, "tiny": _tiny, "tiny2": _tiny2, "demo": _demo, "demo-random": _demo_random}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name]())

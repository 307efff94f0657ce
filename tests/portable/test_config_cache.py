"""ModelConfig validation messages and the cache byte figures of model spec §5."""

import math

import pytest

from dsv4.portable.cache import bytes_per_token, capacity_for, state_bytes, state_spec
from dsv4.portable.config import CSA, HCA, WINDOW, ConfigError, ModelConfig, PRESETS, preset


def test_presets_layer_kinds():
    flash, pro, tiny = preset("flash"), preset("pro"), preset("tiny")
    assert [flash.kind(i) for i in range(5)] == [WINDOW, WINDOW, CSA, HCA, CSA]
    assert sum(flash.kind(i) == CSA for i in range(43)) == 21 and flash.kind(43) == WINDOW
    assert [pro.kind(i) for i in range(3)] == [HCA, HCA, CSA]
    assert sum(pro.kind(i) == HCA for i in range(61)) == 31
    assert [tiny.kind(i) for i in range(7)] == [WINDOW, CSA, HCA, CSA, HCA, WINDOW, WINDOW]
    assert [tiny.hash_routed(i) for i in range(7)] == [True] * 3 + [False] * 4


def test_param_counts_match_the_release():
    c = preset("flash").param_counts()
    assert 283e9 < c["total"] < 286e9 and 13e9 < c["active"] < 14.5e9
    assert 1.55e12 < preset("pro").param_counts()["total"] + preset("pro").param_counts()["mtp"] < 1.65e12


@pytest.mark.parametrize("change,message", [
    ({"compress_ratios": [0, 4, 64, 4, 128, 0, 0]}, "entry 2 is 64; V4 supports only 0 (window), 4 (CSA), 128"),
    ({"compress_ratios": [0, 4, 128]}, "needs num_hidden_layers + num_nextn_predict_layers = 7 entries, got 3"),
    ({"o_groups": 3}, "'o_groups': 3 does not divide num_attention_heads=4"),
    ({"num_key_value_heads": 2}, "one shared K=V head"),
    ({"hidden_size": -5}, "'hidden_size': must be a positive integer"),
    ({"num_experts_per_tok": 9}, "9 > n_routed_experts=8"),
    ({"scoring_func": "softmax"}, "'scoring_func'"),
    ({"qk_rope_head_dim": 63}, "'qk_rope_head_dim': must be even"),
    ({"moe_intermediate_size": 100}, "divisible by 32"),
    ({"model_type": "llama"}, "expected 'deepseek_v4'"),
    # types are checked before values: a wrong type is named, never a crash in a later check or formula
    ({"compress_ratios": 5}, "'compress_ratios': expected a list of integers, got an integer 5"),
    ({"compress_ratios": [0, 4.0, 128, 4, 128, 0, 0]}, "'compress_ratios': expected a list of integers, got a list"),
    ({"rope_scaling": "x"}, "'rope_scaling': expected an object or null, got a string 'x'"),
    ({"qk_rope_head_dim": "64"}, "'qk_rope_head_dim': expected an integer, got a string '64'"),
    ({"vocab_size": 1024.0}, "'vocab_size': expected an integer, got a number 1024.0"),
    ({"hidden_size": True}, "'hidden_size': expected an integer, got a boolean True"),
    ({"num_hash_layers": "2"}, "'num_hash_layers': expected an integer, got a string '2'"),
    ({"rms_norm_eps": "x"}, "'rms_norm_eps': expected a number, got a string 'x'"),
    ({"swiglu_limit": None}, "'swiglu_limit': expected a number, got null"),
    ({"norm_topk_prob": "yes"}, "'norm_topk_prob': expected true or false, got a string 'yes'"),
    ({"quantization_config": [1]}, "'quantization_config': expected an object or null, got a list [1]"),
    ({"encoding": 5}, "'encoding': expected a string, got an integer 5"),
    # values the graph cannot compute with
    ({"rope_theta": -1}, "'rope_theta': must be a finite number > 1, got -1"),
    ({"compress_rope_theta": 1}, "'compress_rope_theta': must be a finite number > 1, got 1"),
    ({"hc_eps": 0}, "'hc_eps': must be a finite number > 0, got 0"),
    ({"routed_scaling_factor": float("nan")}, "'routed_scaling_factor': must be a finite number > 0, got nan"),
    ({"eos_token_id": 1024}, "'eos_token_id': must be a token id in 0..vocab_size-1 (1023), got 1024"),
    ({"rope_scaling": {"type": "yarn", "factor": "16"}}, "'rope_scaling': 'factor' must be a finite number > 0, "
                                                        "got a string '16'"),
    ({"rope_scaling": {"type": "yarn", "beta_slow": 0}}, "'beta_slow' must be a finite number > 0, got an integer 0"),
    ({"quantization_config": {"weight_block_size": 128}}, "weight_block_size must be [128, 128], got an integer 128"),
])
def test_bad_config_gets_one_clear_error(change, message):
    d = dict(PRESETS["tiny"](), **change)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(d)
    assert message in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    for content, message in ((b"[1, 2]", "holds a list [1, 2], not a JSON object"),
                             (b'{"vocab_size": 1024, "x": "\xff"}', "not UTF-8 text (byte 27 is 0xff)"),
                             (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to be a config")):
        (tmp_path / "config.json").write_bytes(content)
        with pytest.raises(ConfigError) as err:
            ModelConfig.from_file(tmp_path)
        assert str(err.value) == f"{tmp_path / 'config.json'}: {message}"
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    (tmp_path / "config.json" / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config.json: cannot be read \(Is a directory\)"):
        ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="a config is a JSON object, got a list"):
        ModelConfig.from_dict([1])


def test_roundtrip_through_dict():
    cfg = preset("tiny2")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(dict(cfg.to_dict(), rope_scaling=None, quantization_config=None)).yarn == {}


def test_bytes_per_token_flash_and_pro():
    assert bytes_per_token(preset("flash"), "bf16") == pytest.approx(6880)
    assert bytes_per_token(preset("pro"), "bf16") == pytest.approx(9848)
    assert abs(bytes_per_token(preset("flash"), "deploy") - 3514) <= 8
    assert 5000 <= bytes_per_token(preset("pro"), "deploy") < 5100
    gib = state_bytes(preset("flash"), 1 << 20, "deploy") / 2 ** 30
    assert 3.3 < gib < 3.6                                   # ≈ 3.43 GiB at 1M tokens


def test_state_bytes_grows_with_blocks_only():
    cfg = preset("flash")
    a, b, c = (state_bytes(cfg, n) for n in (1000, 1003, 1004))
    assert a == b < c                                        # token 1004 completes ratio-4 block 250
    with pytest.raises(ValueError, match="unknown state format"):
        state_bytes(cfg, 10, "fp3")


def test_state_spec_shapes():
    cfg = preset("tiny")
    spec = {b.name: b for b in state_spec(cfg, 2, 512)}
    assert spec["start"].shape == (2,)
    assert spec["L0.window"].shape == (2, 129, 128) and "L0.entries" not in spec      # ring + spill row
    assert spec["L1.entries"].shape == (2, 129, 128) and spec["L1.kv"].shape == (2, 9, 256)
    assert spec["L1.index.keys"].shape == (2, 129, 128) and spec["L1.index.gate"].shape == (2, 9, 256)
    assert spec["L2.entries"].shape == (2, 5, 128) and spec["L2.gate"].shape == (2, 129, 128)
    assert [b.name for b in spec.values() if b.grows] == ["L1.entries", "L1.index.keys", "L2.entries",
                                                         "L3.entries", "L3.index.keys", "L4.entries"]


def test_deploy_spec_bytes_match_the_byte_model():
    """Deploy entries: FP8 nope + E8M0 per 64 + bf16 rope; indexer keys: packed FP4 + E8M0 per 32."""
    cfg = preset("flash")
    spec = {b.name: b for b in state_spec(cfg, 1, 1 << 20, "deploy")}
    assert spec["L2.entries.nope"].shape == (1, 262145, 448) and spec["L2.entries.scale"].shape[-1] == 7
    assert spec["L2.index.keys.fp4"].shape == (1, 262145, 64) and spec["L2.index.keys.scale"].shape[-1] == 4
    size = {"u8": 1, "act": 2}
    held = sum(math.prod(b.shape[1:]) * size[b.kind] for b in spec.values() if b.grows)
    assert abs(held / (1 << 20) - bytes_per_token(cfg, "deploy")) < 1     # up to the spill rows


@pytest.mark.parametrize("tokens,cap", [(0, 128), (1, 128), (128, 128), (129, 256), (300, 384), (513, 640),
                                        (16385, 20480), (1 << 20, 1 << 20)])
def test_capacity_buckets_follow_tokens(tokens, cap):
    assert capacity_for(tokens) == cap
    assert capacity_for(tokens) % 128 == 0 and capacity_for(tokens) <= max(tokens, 1) * 1.25 + 128


def test_capacity_is_clipped_to_the_limit():
    assert capacity_for(300, limit=320) == 320 and capacity_for(2000, limit=1 << 20) == 2048

"""The sharding plan: parts tile every tensor, memory adds up, and what cannot be split is refused."""

import json
import math

import pytest

from dsv4.portable.checkpoint import EXPERTS, weight_schema
from dsv4.portable.config import PRESETS, ModelConfig, preset
from dsv4.portable.sharding import ShardingError, collectives_per_token, memory_plan, shard


@pytest.mark.parametrize("name,world", [("tiny", 2), ("tiny2", 2), ("tiny2", 4), ("flash", 4), ("pro", 8)])
def test_parts_tile_each_tensor(name, world):
    cfg = preset(name)
    split = 0
    for entry in weight_schema(cfg).values():
        if entry.role == EXPERTS:
            continue
        for t in entry.tensors:
            parts = [shard(cfg, r, world).part(t.name, t.shape) for r in range(world)]
            if parts[0] is None:
                assert all(p is None for p in parts), t.name
                continue
            split += 1
            axis = parts[0].axis
            assert all(p.axis == axis for p in parts)
            if t.name.endswith(".scale"):        # the blocks each weight part touches (edges may be shared)
                wt = weight_schema(cfg)[t.name[:-5] + "weight"].tensors[0]
                w = [shard(cfg, r, world).part(wt.name, wt.shape) for r in range(world)]
                assert [(p.start, p.stop) for p in parts] == [(a.start // 128, -(-a.stop // 128)) for a in w]
                continue
            assert [p.start for p in parts] == [i * t.shape[axis] // world for i in range(world)], t.name
            assert parts[-1].stop == t.shape[axis]
    assert split >= 6 * cfg.num_hidden_layers         # every layer splits attention, indexer or shared expert
    experts = [shard(cfg, r, world).experts for r in range(world)]
    assert sorted(e for part in experts for e in part) == list(range(cfg.n_routed_experts))


def test_memory_plan_adds_up():
    cfg = preset("flash")
    one, four = memory_plan(cfg, 1), memory_plan(cfg, 4)
    assert one.per_rank == one.total == four.total
    assert 4 * four.split + four.replicated == pytest.approx(four.total, rel=1e-3)  # scale blocks shared at edges
    assert four.per_rank < 0.3 * four.total          # Flash at TP=4: about a quarter per rank
    assert 140 * 2**30 < four.total < 150 * 2**30


def test_communication_prediction():
    cfg = preset("flash")
    p = collectives_per_token(cfg, 4, entries=512)
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    csa = sum(cfg.is_csa(i) for i in range(layers))
    assert p["all_reduce_values"] == 2 * d * layers + d + 512 * csa
    assert p["bytes_sent"] == int((1.5 * p["all_reduce_values"] + 0.75 * cfg.vocab_size) * 4)
    assert collectives_per_token(cfg, 1)["bytes_sent"] == 0


def test_refuses_what_does_not_divide():
    with pytest.raises(ShardingError, match="2 groups do not divide by 4"):
        shard(preset("tiny"), 0, 4)
    with pytest.raises(ShardingError, match="do not divide by 3"):
        shard(preset("flash"), 0, 3)


def test_refuses_a_part_across_fp8_blocks():
    cfg = ModelConfig.from_dict(dict(PRESETS["tiny"](), moe_intermediate_size=192))
    with pytest.raises(ShardingError, match="shared_experts.w1.weight.*128-wide FP8 scale blocks"):
        shard(cfg, 0, 2)


def test_one_rank_holds_everything():
    cfg = preset("tiny")
    sh = shard(cfg, 0, 1)
    assert sh.heads == cfg.num_attention_heads and len(sh.experts) == cfg.n_routed_experts
    assert all(sh.part(t.name, t.shape) is None for e in weight_schema(cfg).values() for t in e.tensors)
    assert math.isclose(memory_plan(cfg, 1).per_rank, memory_plan(cfg, 1).total)


def test_info_prints_the_per_rank_plan_before_loading():
    from typer.testing import CliRunner

    from dsv4.cli.main import app
    r = CliRunner().invoke(app, ["info", "--model", "flash", "--parallel", "4", "--context", "4096", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["parallel"]
    assert plan["ranks"] == 4 and plan["per_rank_bytes"] == memory_plan(preset("flash"), 4).per_rank
    assert plan["per_token"]["collectives"] == 130
    r = CliRunner().invoke(app, ["info", "--model", "tiny", "--parallel", "4"])
    assert r.exit_code == 2 and "error: cannot split the model over 4 ranks: its 2 groups do not divide by 4" in r.output

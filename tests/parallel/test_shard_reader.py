"""A rank reads only its part of the checkpoint (spy on the reader), and its parts are the right values."""

import pytest

from dsv4.backends.cuda.weights import TorchWeights, dequantize
from dsv4.portable.checkpoint import Checkpoint
from dsv4.portable.config import ModelConfig
from dsv4.portable.sharding import memory_plan, shard
from dsv4.portable.weights import ShardReader

torch = pytest.importorskip("torch")


def _load(path, cfg, rank, world, reads):
    ckpt = Checkpoint(path)
    reader = ShardReader(ckpt, shard(cfg, rank, world)) if world > 1 else ckpt
    raw, part = Checkpoint.raw, Checkpoint.read_part

    def spy_raw(self, name):
        out = raw(self, name)
        reads.append((name, None, out.nbytes))
        return out

    def spy_part(self, name, axis, start, stop):
        out = part(self, name, axis, start, stop)
        reads.append((name, (axis, start, stop), out.nbytes))
        return out
    mp = pytest.MonkeyPatch()
    mp.setattr(Checkpoint, "raw", spy_raw)
    mp.setattr(Checkpoint, "read_part", spy_part)
    try:
        w = TorchWeights(cfg, reader, torch.float32, torch.device("cpu"))
        w.load_all()
    finally:
        mp.undo()
    return w


@pytest.mark.parametrize("world", [4])
def test_each_rank_reads_only_its_bytes(tiny2_dir, world):
    cfg = ModelConfig.from_file(tiny2_dir)
    plan = memory_plan(cfg, world)
    seen = {}
    for rank in range(world):
        reads = []
        _load(tiny2_dir, cfg, rank, world, reads)
        sh = shard(cfg, rank, world)
        assert sum(n for _, _, n in reads) == plan.per_rank           # exactly the planned bytes, nothing more
        for name, where, _ in reads:
            if ".experts." in name and "shared" not in name:
                assert sh.holds_expert(name), f"rank {rank} read another rank's expert {name}"
            full = Checkpoint(tiny2_dir).spec(name).shape
            want = sh.part(name, full)
            assert where == (None if want is None else (want.axis, want.start, want.stop)), name
            seen.setdefault(name, []).append(where)
    assert all(len(v) == world for k, v in seen.items() if ".experts." not in k or "shared" in k)


def test_parts_hold_the_full_tensors_values(tiny2_dir):
    cfg = ModelConfig.from_file(tiny2_dir)
    full = _load(tiny2_dir, cfg, 0, 1, [])
    parts = [_load(tiny2_dir, cfg, r, 4, []) for r in range(4)]
    for name, axis in (("layers.1.attn.wq_b.weight", 0), ("layers.1.attn.wo_b.weight", 1),
                       ("layers.1.ffn.shared_experts.w1.weight", 0), ("layers.1.ffn.shared_experts.w2.weight", 1),
                       ("layers.1.attn.indexer.wq_b.weight", 0)):
        whole = dequantize(full[name], torch.float32)
        got = torch.cat([dequantize(p[name], torch.float32) for p in parts], axis)
        assert torch.equal(got, whole), name
    for name in ("embed.weight", "head.weight", "layers.1.attn.attn_sink", "layers.1.attn.indexer.weights_proj.weight"):
        assert torch.equal(torch.cat([p[name] for p in parts], 0), full[name]), name
    bank = full.experts("layers.1.ffn.experts.")
    for r, p in enumerate(parts):
        mine = p.experts("layers.1.ffn.experts.")
        e = shard(cfg, r, 4).experts.start + 1
        assert torch.equal(dequantize(mine[1][0], torch.float32), dequantize(bank[e][0], torch.float32))


def test_another_ranks_expert_is_refused(tiny2_dir):
    cfg = ModelConfig.from_file(tiny2_dir)
    reader = ShardReader(Checkpoint(tiny2_dir), shard(cfg, 1, 4))
    with pytest.raises(Exception, match="belongs to another rank"):
        reader.quant_weight("layers.0.ffn.experts.0.w1")

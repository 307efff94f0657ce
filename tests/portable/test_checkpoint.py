"""Schema of the official layout, the safetensors reader/writer, and one test per kind of broken checkpoint."""

import dataclasses
import json
import re

import numpy as np
import pytest

from dsv4.portable.checkpoint import (INDEX_NAME, NP_DTYPE, Checkpoint, CheckpointError, TensorSpec, save_safetensors,
                                      save_sharded, schema)
from dsv4.portable.config import preset
from dsv4.portable.quant import bf16_to_f32, f32_to_bf16, quantize_fp4, quantize_fp8_block

TINY = preset("tiny")


# ---------------------------------------------------------------------- schema
def _by_name(cfg):
    return {s.name: s for s in schema(cfg)}


def test_schema_counts_match_released_indices():
    assert len(schema(preset("flash"))) == 69187
    assert len(schema(preset("pro"))) == 145116
    names = [s.name for s in schema(preset("flash"))]
    assert len(set(names)) == len(names)
    assert sum(n.endswith("indexer.wq_b.weight") for n in names) == 21            # CSA layers
    assert sum(n.endswith("compressor.ape") for n in names) == 2 * 21 + 20       # CSA main+indexer, HCA


def test_schema_flash_shapes():
    s = _by_name(preset("flash"))

    def chk(name, dtype, shape):
        assert (s[name].dtype, s[name].shape) == (dtype, shape), name

    chk("embed.weight", "BF16", (129280, 4096))
    chk("hc_head_fn", "F32", (4, 16384))
    chk("layers.0.hc_attn_fn", "F32", (24, 16384))
    chk("layers.0.hc_ffn_scale", "F32", (3,))
    chk("layers.0.attn.wq_a.scale", "F8_E8M0", (8, 32))
    chk("layers.0.attn.wq_b.weight", "F8_E4M3", (32768, 1024))
    chk("layers.0.attn.wkv.scale", "F8_E8M0", (4, 32))
    chk("layers.0.attn.wo_a.weight", "F8_E4M3", (8192, 4096))
    chk("layers.0.attn.wo_b.scale", "F8_E8M0", (32, 64))
    chk("layers.0.attn.attn_sink", "F32", (64,))
    chk("layers.0.ffn.gate.tid2eid", "I64", (129280, 6))
    chk("layers.3.ffn.gate.bias", "F32", (256,))
    chk("layers.7.ffn.experts.255.w1.weight", "I8", (2048, 2048))
    chk("layers.7.ffn.experts.0.w2.weight", "I8", (4096, 1024))
    chk("layers.7.ffn.experts.0.w2.scale", "F8_E8M0", (4096, 64))
    chk("layers.7.ffn.shared_experts.w2.scale", "F8_E8M0", (32, 16))
    chk("layers.2.attn.compressor.wkv.weight", "BF16", (1024, 4096))
    chk("layers.2.attn.compressor.ape", "F32", (4, 1024))
    chk("layers.3.attn.compressor.ape", "F32", (128, 512))
    chk("layers.3.attn.compressor.norm.weight", "BF16", (512,))
    chk("layers.2.attn.indexer.wq_b.scale", "F8_E8M0", (64, 8))
    chk("layers.2.attn.indexer.compressor.ape", "F32", (4, 256))
    chk("layers.2.attn.indexer.compressor.norm.weight", "BF16", (128,))
    chk("mtp.0.e_proj.scale", "F8_E8M0", (32, 32))
    chk("mtp.0.ffn.gate.bias", "F32", (256,))
    chk("mtp.0.hc_head_fn", "F32", (4, 16384))
    for absent in ("layers.3.ffn.gate.tid2eid", "layers.2.ffn.gate.bias", "layers.0.attn.compressor.ape",
                   "layers.3.attn.indexer.wq_b.weight", "mtp.0.ffn.gate.tid2eid", "mtp.0.attn.compressor.ape",
                   "layers.43.attn_norm.weight", "layers.0.ffn.experts.256.w1.weight"):
        assert absent not in s


def test_schema_pro_and_base_shapes():
    s = _by_name(preset("pro"))
    assert s["layers.0.attn.compressor.ape"].shape == (128, 512)                 # Pro starts with HCA
    assert s["layers.5.attn.wo_b.scale"].shape == (56, 128)
    assert s["layers.5.ffn.experts.383.w1.scale"].shape == (3072, 224)
    assert s["layers.5.ffn.experts.0.w1.weight"].shape == (3072, 3584)
    assert s["mtp.0.h_proj.weight"].shape == (7168, 7168)
    base = _by_name(dataclasses.replace(preset("flash"), expert_dtype="fp8"))
    w, sc = base["layers.3.ffn.experts.0.w2.weight"], base["layers.3.ffn.experts.0.w2.scale"]
    assert (w.dtype, w.shape, sc.dtype, sc.shape) == ("F8_E4M3", (4096, 2048), "F32", (32, 16))
    assert base["layers.3.ffn.shared_experts.w2.scale"].dtype == "F8_E8M0"


def test_param_counts_flash():
    pc = preset("flash").param_counts()
    assert abs(pc["total"] - 284e9) < 1e9 and 13e9 < pc["active"] < 14e9


# ---------------------------------------------------------------------- a full tiny checkpoint
def _random_raw(spec: TensorSpec, rng) -> tuple:
    shape = spec.shape
    if spec.dtype == "F8_E4M3":
        data = rng.integers(0, 256, shape, dtype=np.uint8)
        data[(data & 0x7F) == 0x7F] = 0x7E                                        # no NaN codes
    elif spec.dtype == "F8_E8M0":
        data = rng.integers(118, 128, shape, dtype=np.uint8)
    elif spec.dtype == "I8":
        data = rng.integers(0, 256, shape, dtype=np.uint8)
    elif spec.dtype == "BF16":
        data = f32_to_bf16(rng.standard_normal(shape).astype(np.float32))
    elif spec.dtype == "F32":
        data = rng.standard_normal(shape).astype(np.float32)
    else:
        data = rng.integers(0, TINY.n_routed_experts, shape).astype(np.int64)
    return spec.dtype, data


@pytest.fixture(scope="module")
def tiny_tensors():
    rng = np.random.default_rng(7)
    return {s.name: _random_raw(s, rng) for s in schema(TINY)}


def _write(tmp_path, tensors, shard_bytes=3_000_000):
    save_sharded(tmp_path, tensors, shard_bytes)
    return tmp_path


def _shard_of(path, name):
    return json.loads((path / INDEX_NAME).read_text())["weight_map"][name]


def test_sharded_round_trip(tmp_path, tiny_tensors):
    _write(tmp_path, tiny_tensors)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in tiny_tensors.values())
    ck = Checkpoint(tmp_path)
    ck.validate(TINY)
    assert ck.names() == sorted(tiny_tensors)
    for name, (dtype, data) in tiny_tensors.items():
        raw = ck.raw(name)
        assert ck.spec(name).dtype == dtype and raw.dtype == data.dtype.newbyteorder("<")
        np.testing.assert_array_equal(raw, data, err_msg=name)
    assert isinstance(ck.raw("embed.weight"), np.memmap)
    np.testing.assert_array_equal(ck.array("norm.weight"), bf16_to_f32(tiny_tensors["norm.weight"][1]))
    assert ck.raw("layers.0.ffn.gate.tid2eid").dtype == np.int64


def test_read_copies_without_a_map(tmp_path, tiny_tensors):
    """`read` returns the same bytes as `raw`, as a plain array (nothing mapped), into a given buffer too."""
    _write(tmp_path, tiny_tensors)
    ck = Checkpoint(tmp_path)
    for name in ("embed.weight", "layers.1.attn.wq_a.weight", "layers.0.ffn.experts.3.w2.scale"):
        got = ck.read(name)
        assert not isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, ck.raw(name), err_msg=name)
    out = np.full(ck.spec("norm.weight").shape, 7, dtype=np.uint16)
    assert ck.read("norm.weight", out) is out
    np.testing.assert_array_equal(out, tiny_tensors["norm.weight"][1])
    with pytest.raises(ValueError, match="buffer of 2 bytes"):
        ck.read("norm.weight", np.zeros(1, np.uint16))


def test_quant_weights_read_back(tmp_path):
    rng = np.random.default_rng(3)
    w8, w4, wb = rng.standard_normal((130, 200)), rng.standard_normal((64, 96)), rng.standard_normal((3, 5))
    q8, q4, qb = quantize_fp8_block(w8), quantize_fp4(w4), quantize_fp8_block(w8, f32_scale=True)
    save_safetensors(tmp_path / "model.safetensors", {
        "a.weight": ("F8_E4M3", q8.data), "a.scale": ("F8_E8M0", q8.scale),
        "b.weight": ("I8", q4.data.view(np.int8)), "b.scale": ("F8_E8M0", q4.scale),
        "c.weight": ("F8_E4M3", qb.data), "c.scale": ("F32", qb.scale),
        "d.weight": ("BF16", f32_to_bf16(wb))})
    ck = Checkpoint(tmp_path)                                              # directory without an index
    a, b, c, d = (ck.quant_weight(p) for p in "abcd")
    assert (a.fmt, a.shape, b.fmt, b.shape, c.fmt, d.fmt) == ("fp8", (130, 200), "fp4", (64, 96), "fp8", "float")
    np.testing.assert_array_equal(a.dequantize(), q8.dequantize())
    np.testing.assert_array_equal(b.dequantize(), q4.dequantize())
    assert c.scale.dtype == np.float32
    np.testing.assert_array_equal(c.dequantize(), q8.dequantize())
    np.testing.assert_allclose(d.dequantize(), wb, rtol=2 ** -8)
    with pytest.raises(CheckpointError, match="packed FP4"):
        ck.array("b.weight")
    with pytest.raises(CheckpointError, match="'zz.weight' is not in the checkpoint"):
        ck.quant_weight("zz")


def test_single_file_path_and_safetensors_compat(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    rng = np.random.default_rng(5)
    plain = {"f32": rng.standard_normal((3, 4)).astype(np.float32), "f16": rng.standard_normal(7).astype(np.float16),
             "i64": rng.integers(-9, 9, (2, 2)), "i32": rng.integers(-9, 9, 5).astype(np.int32),
             "u8": rng.integers(0, 255, 6).astype(np.uint8)}
    dt = {"f32": "F32", "f16": "F16", "i64": "I64", "i32": "I32", "u8": "U8"}
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, {k: (dt[k], v) for k, v in plain.items()})
    loaded = st.load_file(str(ours))                                        # the reference reader accepts ours
    for k, v in plain.items():
        np.testing.assert_array_equal(loaded[k], v)
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(plain, str(theirs))                                        # and we read theirs
    ck = Checkpoint(theirs)
    for k, v in plain.items():
        assert ck.spec(k).dtype == dt[k]
        np.testing.assert_array_equal(ck.raw(k), v)
    # a file with BF16 / F8 / I8 tensors still has a header the reference parser accepts
    mixed = tmp_path / "mixed.safetensors"
    save_safetensors(mixed, {"w": ("F8_E4M3", np.arange(6, dtype=np.uint8).reshape(2, 3)),
                             "s": ("F8_E8M0", np.full((1, 1), 127, np.uint8)),
                             "n": ("BF16", f32_to_bf16(np.ones(3, np.float32))), "p": ("I8", np.ones(4, np.int8))})
    with safe_open(str(mixed), framework="np") as f:
        assert sorted(f.keys()) == ["n", "p", "s", "w"]


def test_writer_rejects_decoded_bf16(tmp_path):
    with pytest.raises(CheckpointError, match="BF16 must be given as raw uint16"):
        save_safetensors(tmp_path / "x.safetensors", {"x": ("BF16", np.ones(3, np.float32))})


# ---------------------------------------------------------------------- broken checkpoints
def _errors(path, cfg=TINY) -> str:
    with pytest.raises(CheckpointError) as e:
        Checkpoint(path).validate(cfg)
    return str(e.value)


def test_missing_tensor(tmp_path, tiny_tensors):
    t = dict(tiny_tensors)
    del t["layers.1.attn.indexer.compressor.ape"]
    msg = _errors(_write(tmp_path, t))
    assert msg.startswith(f"checkpoint {tmp_path}: 1 problem:\n")
    assert "missing: layers.1.attn.indexer.compressor.ape (expected F32 [4, 256])" in msg
    with pytest.raises(CheckpointError, match=r"'layers\.1\.attn\.indexer\.compressor\.ape' is not in"):
        Checkpoint(tmp_path).raw("layers.1.attn.indexer.compressor.ape")


def test_extra_tensor(tmp_path, tiny_tensors):
    t = dict(tiny_tensors, **{"layers.6.attn_norm.weight": ("BF16", f32_to_bf16(np.ones(256, np.float32)))})
    msg = _errors(_write(tmp_path, t))
    assert "unexpected: layers.6.attn_norm.weight (BF16 [256])" in msg and ": 1 problem:" in msg


def test_wrong_shape(tmp_path, tiny_tensors):
    t = dict(tiny_tensors, **{"layers.2.attn.compressor.ape": ("F32", np.ones((4, 512), np.float32))})
    msg = _errors(_write(tmp_path, t))
    assert "wrong shape: layers.2.attn.compressor.ape: expected [128, 128], found [4, 512]" in msg


def test_wrong_dtype(tmp_path, tiny_tensors):
    bf = f32_to_bf16(np.ones((128, 256), np.float32))
    t = dict(tiny_tensors, **{"layers.0.attn.wq_a.weight": ("BF16", bf)})
    msg = _errors(_write(tmp_path, t))
    assert "wrong dtype: layers.0.attn.wq_a.weight: expected F8_E4M3, found BF16" in msg


def test_many_problems_in_one_error(tmp_path, tiny_tensors):
    t = dict(tiny_tensors, **{"extra": ("F32", np.ones(2, np.float32)),
                              "norm.weight": ("BF16", f32_to_bf16(np.ones(3, np.float32)))})
    del t["head.weight"]
    msg = _errors(_write(tmp_path, t))
    assert msg.startswith(f"checkpoint {tmp_path}: 3 problems:\n") and len(msg.splitlines()) == 4
    assert all(s in msg for s in ("missing: head.weight", "unexpected: extra", "wrong shape: norm.weight"))


def test_truncated_shard(tmp_path, tiny_tensors):
    _write(tmp_path, tiny_tensors)
    shard = tmp_path / _shard_of(tmp_path, "mtp.0.norm.weight")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    msg = _errors(tmp_path)
    need, holds = re.search(rf"{shard.name}: truncated: its header needs (\d+) data bytes, the file holds (\d+)",
                            msg).groups()
    assert int(need) - int(holds) == 1000
    broken = re.search(r"unreadable: (\S+): data_offsets \[\d+, \d+\] lie beyond the end of " + shard.name, msg)
    ck = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be read: data_offsets"):
        ck.raw(broken.group(1))
    np.testing.assert_array_equal(ck.raw("embed.weight"), tiny_tensors["embed.weight"][1])   # other shards fine


def test_index_names_missing_shard(tmp_path, tiny_tensors):
    _write(tmp_path, tiny_tensors)
    fname = _shard_of(tmp_path, "layers.4.ffn.gate.bias")
    (tmp_path / fname).unlink()
    msg = _errors(tmp_path)
    assert f"{INDEX_NAME} names shard '{fname}', which does not exist" in msg
    assert f"unreadable: layers.4.ffn.gate.bias: its shard '{fname}' does not exist" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path).array("layers.4.ffn.gate.bias")


def test_bad_headers(tmp_path, tiny_tensors):
    _write(tmp_path, tiny_tensors)
    garbled = tmp_path / _shard_of(tmp_path, "embed.weight")
    with open(garbled, "r+b") as f:
        f.seek(8)
        f.write(b"#not json")
    oversized = tmp_path / _shard_of(tmp_path, "mtp.0.norm.weight")
    assert oversized != garbled
    with open(oversized, "r+b") as f:
        f.write((10 ** 12).to_bytes(8, "little"))
    msg = _errors(tmp_path)
    assert f"{garbled.name}: bad header: header is not valid JSON" in msg
    assert f"{oversized.name}: bad header: header length 1000000000000 exceeds the file size" in msg
    assert f"unreadable: embed.weight: the header of {garbled.name} is unreadable" in msg
    with pytest.raises(CheckpointError, match="header of .* is unreadable"):
        Checkpoint(tmp_path).raw("embed.weight")


def test_bad_index(tmp_path, tiny_tensors):
    _write(tmp_path, tiny_tensors)
    (tmp_path / INDEX_NAME).write_text("{oops")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Checkpoint(tmp_path / "nowhere")


# ---------------------------------------------------------------------- id tables (hash routing)
def _with_tables(tmp_path, tiny_tensors, dtype, fill=None):
    """The tiny tensors with every `tid2eid` table stored as `dtype` (values as given, or the originals)."""
    tables = {n: (dtype, np.asarray(fill if fill is not None else a).astype(NP_DTYPE[dtype]))
              for n, (_, a) in tiny_tensors.items() if n.endswith("tid2eid")}
    assert tables
    return _write(tmp_path, {**tiny_tensors, **tables}), sorted(tables)


@pytest.mark.parametrize("dtype", ["I32", "U16", "I64", "U8"])
def test_id_tables_of_any_integer_dtype_are_accepted(tmp_path, tiny_tensors, dtype):
    path, names = _with_tables(tmp_path, tiny_tensors, dtype)
    ck = Checkpoint(path)
    ck.validate(TINY)
    ids = ck.table(names[0], TINY.n_routed_experts)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, tiny_tensors[names[0]][1])


def test_id_tables_out_of_range_or_not_integer_are_one_clear_error(tmp_path, tiny_tensors):
    table = tiny_tensors["layers.0.ffn.gate.tid2eid"][1].copy()
    table[5, 1] = TINY.n_routed_experts                                         # one id too large
    path, _ = _with_tables(tmp_path / "big", {**tiny_tensors, "layers.0.ffn.gate.tid2eid": ("I64", table)}, "I32")
    msg = _errors(path)
    assert (f"bad ids: layers.0.ffn.gate.tid2eid: 1 ids outside 0..{TINY.n_routed_experts - 1} (n_routed_experts "
            f"is {TINY.n_routed_experts}), e.g. {TINY.n_routed_experts} at [5, 1]") in msg
    with pytest.raises(CheckpointError, match=r"1 ids outside 0\.\.7"):
        Checkpoint(path).table("layers.0.ffn.gate.tid2eid", TINY.n_routed_experts)
    negative = tiny_tensors["layers.0.ffn.gate.tid2eid"][1] - 1                  # ids 0 → -1
    path, _ = _with_tables(tmp_path / "neg", tiny_tensors, "I32", fill=negative)
    assert "ids outside 0..7" in _errors(path) and ", e.g. -1 at" in _errors(path)
    path, _ = _with_tables(tmp_path / "float", tiny_tensors, "F32")
    assert "wrong dtype: layers.0.ffn.gate.tid2eid: expected an integer dtype, found F32" in _errors(path)


def test_an_int32_table_checkpoint_loads_and_routes_as_the_int64_one(tmp_path, tiny_dir, rand_ids):
    """A checkpoint saved by another tool (int32 `tid2eid`) loads on the reference and gives the same logits."""
    import dsv4
    ck = Checkpoint(tiny_dir)
    tensors = {n: (ck.spec(n).dtype, np.array(ck.raw(n))) for n in ck.names()}
    for n in tensors:
        if n.endswith("tid2eid"):
            tensors[n] = ("I32", tensors[n][1].astype(np.int32))
    out = _write(tmp_path, tensors)
    (out / "config.json").write_text((tiny_dir / "config.json").read_text())
    (out / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text())
    ids = rand_ids(40, seed=4)
    want = dsv4.load(tiny_dir, context=64).forward(ids)
    got = dsv4.load(out, context=64).forward(ids)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


# ---------------------------------------------------------------------- roles and the schema cache
def test_every_schema_tensor_has_one_role():
    from dsv4.portable.checkpoint import EXPERTS, FP32, LINEAR, PLAIN, TABLE, weight_schema
    for cfg in (TINY, preset("tiny2"), preset("flash")):
        entries = weight_schema(cfg)
        assert [t for e in entries.values() for t in e.tensors] == list(schema(cfg))
        roles = {e.name: e.role for e in entries.values()}
        assert roles["embed.weight"] == PLAIN and roles["head.weight"] == FP32
        assert roles["layers.1.ffn.gate.weight"] == FP32 and roles["layers.1.attn.attn_sink"] == FP32
        assert roles["layers.1.attn.wq_a.weight"] == LINEAR and roles["layers.1.ffn.experts."] == EXPERTS
        assert roles["layers.0.ffn.gate.tid2eid"] == TABLE
        bank = entries["layers.1.ffn.experts."]
        assert bank.experts == cfg.n_routed_experts == len(bank.linears()) // 3
        for e in entries.values():                   # a linear is exactly weight + scale pairs
            if e.role in (LINEAR, EXPERTS):
                assert [t.name for t in e.tensors] == [f"{p}.{k}" for p in e.linears() for k in ("weight", "scale")]
            else:
                assert len(e.tensors) == 1 and not e.linears()


def test_the_schema_is_built_once_per_config(monkeypatch):
    from dsv4.portable import checkpoint
    calls = []
    build = checkpoint._build_schema
    monkeypatch.setattr(checkpoint, "_SCHEMAS", {})
    monkeypatch.setattr(checkpoint, "_build_schema", lambda cfg: calls.append(cfg) or build(cfg))
    flash = preset("flash")
    first = checkpoint.weight_schema(flash)
    assert checkpoint.weight_schema(preset("flash")) is first and checkpoint.schema(flash) is checkpoint.schema(flash)
    flash.param_counts()
    assert len(calls) == 1
    checkpoint.schema(dataclasses.replace(flash, n_routed_experts=128))
    assert len(calls) == 2


# ---------------------------------------------------------------------- files that are not what they claim
def test_a_safetensors_directory_or_a_deep_header_is_one_problem(tmp_path, tiny_tensors):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError) as e:
        Checkpoint(tmp_path)
    assert str(e.value) == (f"{tmp_path}: neither {INDEX_NAME} nor any *.safetensors file "
                            f"(model.safetensors is not a file)")
    save_safetensors(tmp_path / "weights.safetensors", tiny_tensors)   # beside real weights: one problem
    assert _errors(tmp_path) == f"checkpoint {tmp_path}: 1 problem:\n  model.safetensors is not a file"
    deep = tmp_path / "deep"
    deep.mkdir()
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (deep / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert "model.safetensors: bad header: header JSON is nested too deeply" in _errors(deep)
    (tmp_path / INDEX_NAME).mkdir()
    with pytest.raises(CheckpointError, match=r"not a valid safetensors index \(IsADirectoryError: Is a directory\)"):
        Checkpoint(tmp_path)


def test_malformed_header_entries_are_named(tmp_path, tiny_tensors):
    _write(tmp_path, tiny_tensors)
    shard = tmp_path / _shard_of(tmp_path, "norm.weight")
    blob = shard.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    other = next(k for k in header if k not in ("__metadata__", "norm.weight"))
    header["norm.weight"]["dtype"] = ["BF16"]                                   # unhashable: used to crash
    header[other]["shape"] = [-1] * len(header[other]["shape"])                 # a negative size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    shard.write_bytes(blob[:8] + text + blob[8 + n:])
    msg = _errors(tmp_path)
    assert msg.startswith(f"checkpoint {tmp_path}: 2 problems:\n")
    assert "unreadable: norm.weight: malformed header entry {" in msg and "'dtype': ['BF16']" in msg
    assert f"unreadable: {other}: malformed header entry" in msg and "'shape': [-1" in msg


# ---------------------------------------------------------------------- NaN / Inf in the stored values
def test_nonfinite_codes_of_every_format():
    """Exhaustive over each raw format: a code is flagged exactly when it decodes to NaN or ±Inf."""
    from dsv4.portable.quant import (bf16_nonfinite, e4m3_nonfinite, e4m3_to_f32, e8m0_nonfinite,
                                     e8m0_to_f32)
    words, codes = np.arange(1 << 16, dtype=np.uint16), np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(bf16_nonfinite(words), ~np.isfinite(bf16_to_f32(words)))
    np.testing.assert_array_equal(e4m3_nonfinite(codes), ~np.isfinite(e4m3_to_f32(codes)))
    np.testing.assert_array_equal(e8m0_nonfinite(codes), ~np.isfinite(e8m0_to_f32(codes)))
    assert bf16_nonfinite(words).sum() == 2 * 128 and e4m3_nonfinite(codes).sum() == 2
    assert list(np.flatnonzero(e8m0_nonfinite(codes))) == [255]


def _poisoned(tiny_tensors):
    """The tiny tensors with one broken value (or format) of each kind the scan must find."""
    t = dict(tiny_tensors)
    norm = t["norm.weight"][1].copy()
    norm[3] = 0x7FC0                                                          # bf16 NaN
    t["norm.weight"] = ("BF16", norm)
    t["head.weight"] = ("BF16", np.full_like(t["head.weight"][1], 0x7F80))    # all +Inf
    scale = t["layers.1.attn.wq_a.scale"][1].copy()
    scale[0, 1] = 0xFF                                                        # E8M0 NaN
    t["layers.1.attn.wq_a.scale"] = ("F8_E8M0", scale)
    w = t["layers.0.attn.wkv.weight"][1].copy()
    w[5, 7], w[100, 200] = 0x7F, 0xFF                                          # e4m3 NaN codes
    t["layers.0.attn.wkv.weight"] = ("F8_E4M3", w)
    sink = t["layers.2.attn.attn_sink"][1].copy()
    sink[-1] = -np.inf
    t["layers.2.attn.attn_sink"] = ("F32", sink)
    fp4 = t["layers.1.ffn.experts.0.w1.weight"][1].copy()
    fp4[:] = 0xFF                                                             # e2m1 has no NaN: -6, -6
    t["layers.1.ffn.experts.0.w1.weight"] = ("I8", fp4)
    return t


def test_nonfinite_values_are_named_per_tensor(tmp_path, tiny_tensors):
    path = _write(tmp_path, _poisoned(tiny_tensors))
    ck = Checkpoint(path)
    ck.validate(TINY, values=False)                                           # the headers are fine
    problems = ck.check(TINY)
    assert problems == [
        "non-finite: head.weight: 262144 of 262144 values are NaN or Inf, the first at [0, 0]",
        "non-finite: norm.weight: 1 of 256 values are NaN or Inf, the first at [3]",
        "non-finite: layers.0.attn.wkv.weight: 2 of 32768 values are NaN or Inf, the first at [5, 7]",
        "non-finite: layers.1.attn.wq_a.scale: 1 of 2 values are NaN or Inf, the first at [0, 1]",
        "non-finite: layers.2.attn.attn_sink: 1 of 4 values are NaN or Inf, the first at [3]"]
    with pytest.raises(CheckpointError) as e:
        ck.validate(TINY)
    assert str(e.value).startswith(f"checkpoint {path}: 5 problems:\n  non-finite: head.weight: ")
    seen = []
    ck.check(TINY, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_scan_reads_in_chunks_and_counts_across_them(tmp_path, tiny_tensors):
    """Chunks of 7 bytes split bf16 words' neighbours and FP8 rows: counts and first positions are those of
    one whole read, and only one chunk is ever held."""
    ck = Checkpoint(_write(tmp_path, _poisoned(tiny_tensors)))
    for name in ("head.weight", "norm.weight", "layers.0.attn.wkv.weight", "layers.1.attn.wq_a.scale",
                 "layers.2.attn.attn_sink", "embed.weight"):
        assert ck.nonfinite(name, chunk_bytes=7) == ck.nonfinite(name), name
    assert ck.nonfinite("embed.weight") is None
    assert ck.nonfinite("layers.1.ffn.experts.0.w1.weight") is None            # FP4: nothing to find

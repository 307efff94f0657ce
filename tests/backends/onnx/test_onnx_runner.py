"""The onnxruntime backend vs the float64 reference (ladder steps 2–3) and its errors on broken exports."""

import json
import shutil

import numpy as np
import pytest

import dsv4
from dsv4.export import ExportError

CONTEXT = 512          # state capacity of the test exports (small: the reference is slow at 4096)

TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    made = {}

    def get(ckpt_dir):
        if str(ckpt_dir) not in made:
            made[str(ckpt_dir)] = dsv4.load(ckpt_dir, backend="reference", dtype="float64", context=CONTEXT)
        return made[str(ckpt_dir)]
    return get


def rel_per_position(got, ref):
    """max |got − ref| / max |ref| at each position (rows of [S, V])."""
    return np.abs(got - ref).max(-1) / np.abs(ref).max(-1)


def assert_state_equal(got: dict, ref: dict):
    assert list(got) == list(ref)
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, k
        if k == "start":
            np.testing.assert_array_equal(g, r)
            continue
        scale = np.abs(r).max()
        assert scale > 0, k
        assert np.abs(g - r).max() <= TOL * scale, k


def test_one_shot_300_matches_reference(tiny_any, onnx_export, reference, rand_ids):
    ids = rand_ids(300, seed=21)
    ref = reference(tiny_any)
    onnx = dsv4.load(onnx_export(tiny_any, CONTEXT), backend="onnx", context=CONTEXT)
    got, st = onnx.step(onnx.new_state(), ids[None])
    rst = ref.new_state()
    want, _ = ref.runner.step(rst, ids[None])
    assert rel_per_position(got[0], want[0]).max() <= TOL
    assert st.capacity == rst.capacity == 384
    assert_state_equal(onnx.runner.state_to_numpy(st), ref.runner.state_to_numpy(rst))


def test_prefill_201_then_99_decodes_grow_across_a_bucket_and_match_reference(tiny_any, onnx_export, reference,
                                                                              rand_ids):
    """The state grows 256 → 384 tokens during the decodes (rows held are kept, one export serves both
    capacities); logits match the reference's one-shot forward and the state its step-by-step state."""
    ids = rand_ids(300, seed=22)
    ref = reference(tiny_any)
    onnx = dsv4.load(onnx_export(tiny_any, CONTEXT), backend="onnx", context=CONTEXT)
    one_shot = ref.forward(ids, full_precision=True)
    st, rst, outs, caps = onnx.new_state(), ref.new_state(), [], set()
    for a, b in [(0, 201)] + [(i, i + 1) for i in range(201, 300)]:
        logits, st = onnx.step(st, ids[None, a:b])
        ref.runner.step(rst, ids[None, a:b])
        outs.append(logits[0])
        caps.add(onnx.state_info(st)["capacity"])
    got = np.concatenate(outs)
    assert caps == {256, 384}
    assert rel_per_position(got, one_shot).max() <= TOL
    assert onnx.runner.position(st) == 300
    assert onnx.state_info(st) == {"tokens": 300, "capacity": 384, "bytes": st.nbytes()}
    assert_state_equal(onnx.runner.state_to_numpy(st), ref.runner.state_to_numpy(rst))


def test_batch_of_sequences_at_different_positions_and_capacities(tiny_dir, onnx_export, rand_ids):
    """Dynamic batch: two sequences with their own `start` (and, before stacking, their own capacity) run
    together exactly as they do alone, and split back into the states they reach alone."""
    onnx = dsv4.load(onnx_export(tiny_dir, CONTEXT), backend="onnx", context=CONTEXT)
    r = onnx.runner
    a, b = rand_ids(40, seed=1), rand_ids(200, seed=2)
    sa, sb = onnx.new_state(), onnx.new_state()
    onnx.step(sa, a[None, :13])
    onnx.step(sb, b[None, :191])
    assert (sa.capacity, sb.capacity) == (128, 256)
    alone_a, alone_b = onnx.fork_state(sa), onnx.fork_state(sb)
    la, _ = onnx.step(alone_a, a[None, 13:18])
    lb, _ = onnx.step(alone_b, b[None, 191:196])
    both = r.stack([sa, sb])
    lab, both = onnx.step(both, np.stack([a[13:18], b[191:196]]))
    np.testing.assert_allclose(lab[0], la[0], rtol=0, atol=1e-5 * np.abs(la).max())
    np.testing.assert_allclose(lab[1], lb[0], rtol=0, atol=1e-5 * np.abs(lb).max())
    np.testing.assert_array_equal(both["start"], [18, 196])
    back_a, back_b = r.split(both)
    alone_a.resize(r.ops, 256)
    grows = {b.name for b in alone_a.specs if b.grows}
    for back, alone in ((back_a, alone_a), (back_b, alone_b)):
        for k, v in alone.items():          # the spill row of a growing buffer holds skipped writes: not state
            got, v = (back[k][:, :-1], v[:, :-1]) if k in grows else (back[k], v)
            np.testing.assert_allclose(got, v, rtol=0, atol=1e-5 * max(np.abs(v).max(), 1), err_msg=k)


def test_fork_diverges_independently(tiny_dir, onnx_export, rand_ids):
    onnx = dsv4.load(onnx_export(tiny_dir, CONTEXT), backend="onnx", context=CONTEXT)
    ids = rand_ids(60, seed=3)
    parent = onnx.new_state()
    onnx.step(parent, ids[None, :50])
    child = onnx.fork_state(parent)
    before = onnx.runner.state_to_numpy(parent)
    lc, _ = onnx.step(child, ids[None, 50:60])
    assert onnx.runner.position(parent) == 50 and onnx.runner.position(child) == 60
    for k, v in onnx.runner.state_to_numpy(parent).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    lp, _ = onnx.step(parent, ids[None, 50:60])
    np.testing.assert_array_equal(lp, lc)


def test_mtp_graph_matches_reference(tiny_dir, onnx_export, reference, rand_ids):
    ids = rand_ids(61, seed=23)
    want = reference(tiny_dir).mtp_forward(ids[:60], ids[1:])
    got = dsv4.load(onnx_export(tiny_dir, CONTEXT), backend="onnx", context=CONTEXT).mtp_forward(ids[:60], ids[1:])
    assert rel_per_position(got, want).max() <= TOL


# ---------------------------------------------------------------------- broken or mismatched exports
@pytest.fixture
def export_copy(tiny_dir, onnx_export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(onnx_export(tiny_dir, CONTEXT), dst)
    return dst


def test_missing_external_data(export_copy):
    (export_copy / "model.onnx.data").unlink()
    with pytest.raises(ExportError, match="external weight data model.onnx.data is missing"):
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)


def test_truncated_external_data(export_copy):
    with open(export_copy / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ExportError, match="has 1000 bytes, the manifest expects"):
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)


def test_config_that_does_not_match_the_graphs(export_copy):
    p = export_copy / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "rms_norm_eps": 1e-5}))
    with pytest.raises(ExportError, match="config.json does not match the exported graphs .*rms_norm_eps"):
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)


def test_missing_manifest_and_graph(export_copy):
    (export_copy / "mtp.onnx").unlink()
    with pytest.raises(ExportError, match="the mtp graph file mtp.onnx named in manifest.json is missing"):
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)
    (export_copy / "manifest.json").unlink()
    with pytest.raises(ExportError, match="not a dsv4 ONNX export: no manifest.json"):
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)


def test_an_export_of_another_format_version_names_the_re_export_command(export_copy, tiny_dir):
    p = export_copy / "manifest.json"
    m = json.loads(p.read_text())
    p.write_text(json.dumps({**m, "version": 2}))
    with pytest.raises(ExportError) as e:
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)
    assert str(e.value) == (f"{export_copy} is a 'dsv4-onnx' export of version 2; this dsv4 reads version 3: "
                            f"re-export it with `dsv4 export onnx {tiny_dir.resolve()} NEW_DIR`")
    del m["source"]
    p.write_text(json.dumps({**m, "version": 2}))
    with pytest.raises(ExportError, match="re-export it with `dsv4 export onnx CHECKPOINT_DIR NEW_DIR`"):
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)


def test_corrupt_graph_file(export_copy):
    (export_copy / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="onnxruntime cannot load this graph"):
        dsv4.load(export_copy, backend="onnx", context=CONTEXT)


def test_context_beyond_the_export_and_emulation_are_refused(tiny_dir, onnx_export):
    out = onnx_export(tiny_dir, CONTEXT)
    model = dsv4.load(out, backend="onnx", context=CONTEXT)
    with pytest.raises(ExportError, match=f"exported with a context of {CONTEXT} tokens"):
        model.runner.new_state(1, 2 * CONTEXT)
    with pytest.raises(ExportError, match="emulate=True"):
        dsv4.load(out, backend="onnx", emulate=True)
    with pytest.warns(UserWarning, match="exported in float32"):
        dsv4.load(out, backend="onnx", dtype="bfloat16")


def test_deploy_state_format_is_refused_at_load(tiny_dir, onnx_export):
    out = onnx_export(tiny_dir, CONTEXT)
    with pytest.raises(ExportError, match="state_format='deploy' is not supported by the onnx backend"):
        dsv4.load(out, backend="onnx", state_format="deploy")
    with pytest.warns(UserWarning, match="exported in float32"):     # bfloat16 defaults to bf16 state on onnx
        assert dsv4.load(out, backend="onnx", dtype="bfloat16").runner.new_state(1).fmt == "bf16"


def test_export_without_mtp_says_so(tiny_dir, onnx_export):
    model = dsv4.load(onnx_export(tiny_dir, CONTEXT, mtp=False), backend="onnx")
    with pytest.raises(ExportError, match="exported without the MTP block"):
        model.runner.new_mtp_state(1, CONTEXT)


def test_default_context_is_the_exports_capacity(tiny_dir, onnx_export):
    """Loading an export without `context=` uses the state capacity it was exported with."""
    model = dsv4.load(onnx_export(tiny_dir, 128, mtp=False), backend="onnx")
    assert model.context == 128
    with pytest.raises(dsv4.ContextError, match="129 tokens exceed this model's context of 128"):
        model.forward(list(range(3, 132)))

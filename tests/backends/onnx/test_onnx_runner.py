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
        fin = np.isfinite(r)
        np.testing.assert_array_equal(np.isfinite(g), fin, err_msg=k)
        np.testing.assert_array_equal(g[~fin], r[~fin], err_msg=k)
        scale = np.abs(r[fin]).max()
        assert scale > 0, k
        assert np.abs(g[fin] - r[fin]).max() <= TOL * scale, k


def test_one_shot_300_matches_reference(tiny_any, onnx_export, reference, rand_ids):
    ids = rand_ids(300, seed=21)
    ref = reference(tiny_any)
    onnx = dsv4.load(onnx_export(tiny_any, CONTEXT), backend="onnx", context=CONTEXT)
    got, st = onnx.step(onnx.new_state(), ids[None])
    want, rst, _ = ref.runner.step(ref.new_state(), ids[None])
    assert rel_per_position(got[0], want[0]).max() <= TOL
    assert_state_equal(onnx.runner.state_to_numpy(st), ref.runner.state_to_numpy(rst))


def test_prefill_201_then_99_decodes_match_reference(tiny_any, onnx_export, reference, rand_ids):
    ids = rand_ids(300, seed=22)
    ref = reference(tiny_any)
    onnx = dsv4.load(onnx_export(tiny_any, CONTEXT), backend="onnx", context=CONTEXT)
    one_shot = ref.forward(ids, full_precision=True)
    st, rst, outs = onnx.new_state(), ref.new_state(), []
    for a, b in [(0, 201)] + [(i, i + 1) for i in range(201, 300)]:
        logits, st = onnx.step(st, ids[None, a:b])
        _, rst, _ = ref.runner.step(rst, ids[None, a:b])
        outs.append(logits[0])
    got = np.concatenate(outs)
    assert rel_per_position(got, one_shot).max() <= TOL
    assert onnx.runner.position(st) == 300
    assert_state_equal(onnx.runner.state_to_numpy(st), ref.runner.state_to_numpy(rst))


def test_batch_of_sequences_at_different_positions(tiny_dir, onnx_export, rand_ids):
    """Dynamic batch: two sequences with their own `start` run together exactly as they do alone."""
    onnx = dsv4.load(onnx_export(tiny_dir, CONTEXT), backend="onnx", context=CONTEXT)
    a, b = rand_ids(40, seed=1), rand_ids(40, seed=2)
    sa, sb = onnx.new_state(), onnx.new_state()
    _, sa = onnx.step(sa, a[None, :13])
    _, sb = onnx.step(sb, b[None, :31])
    la, _ = onnx.step(sa, a[None, 13:18])
    lb, _ = onnx.step(sb, b[None, 31:36])
    both = {k: np.concatenate([sa[k], sb[k]]) for k in sa}
    lab, st = onnx.step(both, np.stack([a[13:18], b[31:36]]))
    np.testing.assert_allclose(lab[0], la[0], rtol=0, atol=1e-5 * np.abs(la).max())
    np.testing.assert_allclose(lab[1], lb[0], rtol=0, atol=1e-5 * np.abs(lb).max())
    np.testing.assert_array_equal(st["start"], [18, 36])


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

"""The exported directory itself: a valid standard-opset graph, external weights, manifest, dtypes."""

import json
import shutil

import numpy as np
import onnx
import pytest

import dsv4
from dsv4.export import ExportError, estimate_size, export_onnx
from dsv4.portable.cache import mtp_state_spec, state_spec
from dsv4.portable.config import ModelConfig

CONTEXT = 512          # state capacity of the test exports (small: the reference is slow at 4096)


def _graph(path):
    return onnx.load(str(path), load_external_data=False)


def test_graph_is_standard_opset_and_passes_checker(tiny_any, onnx_export):
    out = onnx_export(tiny_any, CONTEXT)
    for f in ("model.onnx", "mtp.onnx"):
        onnx.checker.check_model(str(out / f), full_check=True)
        m = _graph(out / f)
        assert [(o.domain, o.version) for o in m.opset_import] == [("", 21)]
        assert {n.domain for n in m.graph.node} <= {""}


def test_io_follows_the_state_schema_with_dynamic_batch_and_seq(tiny_any, onnx_export):
    out = onnx_export(tiny_any, CONTEXT)
    cfg = ModelConfig.from_file(tiny_any)
    g = _graph(out / "model.onnx").graph
    names = [b.name for b in state_spec(cfg, 1, CONTEXT)]
    assert [i.name for i in g.input] == ["input_ids"] + [f"past.{n}" for n in names]
    assert [o.name for o in g.output] == ["logits"] + [f"present.{n}" for n in names] + ["hidden_streams"]
    ids_dims = [d.dim_param for d in g.input[0].type.tensor_type.shape.dim]
    assert ids_dims == ["batch", "seq"]
    win = next(i for i in g.input if i.name == "past.L0.win").type.tensor_type.shape.dim
    assert win[0].dim_param == "batch" and win[1].dim_value == cfg.sliding_window
    mg = _graph(out / "mtp.onnx").graph
    mtp_names = [f"past.{b.name}" for b in mtp_state_spec(cfg, 1, CONTEXT)]
    assert [i.name for i in mg.input] == ["input_ids"] + mtp_names + ["hidden_streams"]


def test_weights_are_external_and_the_graph_file_small(tiny_dir, onnx_export):
    out = onnx_export(tiny_dir, CONTEXT)
    m = _graph(out / "model.onnx")
    big = [t for t in m.graph.initializer if "." in t.name]            # checkpoint tensors (constants: const_N)
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    data = (out / "model.onnx.data").stat().st_size
    assert (out / "model.onnx").stat().st_size < 0.05 * data


def test_manifest_config_and_tokenizer(tiny_dir, onnx_export):
    out = onnx_export(tiny_dir, CONTEXT)
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "dsv4-onnx" and man["dtype"] == "float32" and man["max_len"] == CONTEXT
    assert man["data"]["bytes"] == (out / "model.onnx.data").stat().st_size
    assert json.loads((out / "config.json").read_text()) == man["config"]
    assert man["config"]["max_position_embeddings"] == CONTEXT
    assert (out / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    fills = {e["name"]: float(e["fill"]) for e in man["graphs"]["main"]["state"]}
    assert fills["L1.cgate"] == float("-inf") and fills["L1.comp"] == 0.0


def test_size_estimate_and_progress(tiny_dir, tmp_path):
    seen = []
    out = export_onnx(tiny_dir, tmp_path / "o", dtype="bfloat16", context=64, mtp=False,
                      progress=lambda done, total: seen.append((done, total)))
    data = (out / "model.onnx.data").stat().st_size
    est = estimate_size(tiny_dir, "bfloat16", mtp=False)
    assert abs(est - data) <= 0.01 * data
    assert len(seen) > 10 and seen[-1][0] == seen[-1][1] == est
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert estimate_size(tiny_dir, "float32") > 1.8 * estimate_size(tiny_dir, "bfloat16")
    assert not (out / "mtp.onnx").exists()
    assert "hidden_streams" not in [o.name for o in _graph(out / "model.onnx").graph.output]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_exports(tiny_dir, onnx_export, rand_ids, dtype):
    """Quantized weights are stored in the export dtype, float32 checkpoint tensors stay float32, and the
    logits follow the reference's bf16-rounding numerics (per-position noise of bf16, not garbage)."""
    out = onnx_export(tiny_dir, CONTEXT, dtype)
    inits = {t.name: t.data_type for t in _graph(out / "model.onnx").graph.initializer}
    want = onnx.TensorProto.BFLOAT16 if dtype == "bfloat16" else onnx.TensorProto.FLOAT16
    assert inits["layers.0.ffn.experts.0.w1.weight.T"] == want
    assert inits["layers.0.hc_attn_fn"] == onnx.TensorProto.FLOAT
    ids = rand_ids(120, seed=11)
    ref = dsv4.load(tiny_dir, backend="reference", dtype="bfloat16", context=CONTEXT).forward(ids)
    got = dsv4.load(out, backend="onnx", dtype=dtype, context=CONTEXT).forward(ids)
    err = np.abs(got - ref).max(1) / np.abs(ref).max(1)
    assert np.median(err) < 3e-2
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_refuses_bad_requests(tiny_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(tiny_dir, tmp_path / "full", context=64)
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_onnx(tiny_dir, tmp_path / "a", dtype="int8", context=64)
    with pytest.raises(ExportError, match="context must be in"):
        export_onnx(tiny_dir, tmp_path / "b", context=10 ** 9)
    shutil.rmtree(tmp_path / "full")

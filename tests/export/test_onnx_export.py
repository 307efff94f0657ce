"""The exported directory itself: a valid standard-opset graph, external weights, manifest, dtypes."""

import json
import shutil

import numpy as np
import onnx
import pytest

import onnxruntime as ort

import dsv4
from dsv4.export import ExportError, estimate_size, export_onnx
from dsv4.export.manifest import buffer_ratio
from dsv4.export.onnx_ops import OnnxOps
from dsv4.export.symbolic import FLOAT, Graph, Sym, TraceError
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


def test_io_follows_the_state_schema_with_dynamic_batch_seq_and_capacity(tiny_any, onnx_export):
    out = onnx_export(tiny_any, CONTEXT)
    cfg = ModelConfig.from_file(tiny_any)
    g = _graph(out / "model.onnx").graph
    specs = state_spec(cfg, 1, CONTEXT)
    assert [i.name for i in g.input] == ["input_ids"] + [f"past.{b.name}" for b in specs]
    written = [[f"present.{b.name}"] if b.name == "start" else [f"present.{b.name}.rows", f"present.{b.name}.index"]
               for b in specs]
    assert [o.name for o in g.output] == ["logits"] + sum(written, []) + ["hidden_streams"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["past.L0.window"] == ["batch", cfg.sliding_window + 1, cfg.head_dim]     # rings: static
    for b in specs[1:]:                                                                  # entries: dynamic rows
        rows = f"capacity/{buffer_ratio(cfg, b.name)}+1" if b.grows else b.shape[1]
        assert dims[f"past.{b.name}"] == ["batch", rows, *b.shape[2:]], b.name
    assert sum(b.grows for b in specs) >= 4
    mg = _graph(out / "mtp.onnx").graph
    mtp_names = [f"past.{b.name}" for b in mtp_state_spec(cfg, 1, CONTEXT)]
    assert [i.name for i in mg.input] == ["input_ids"] + mtp_names + ["hidden_streams"]


def test_a_decode_step_outputs_only_its_new_rows(tiny_dir, onnx_export, rand_ids):
    """The state outputs of a one-token step are one row (and index) per buffer, at any capacity: what a
    step returns never grows with the state, while the inputs it reads do."""
    out = onnx_export(tiny_dir, CONTEXT)
    model = dsv4.load(out, backend="onnx", context=CONTEXT)
    g = model.runner.manifest["graphs"]["main"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    shapes = {}
    for capacity in (128, CONTEXT):
        st = model.new_state() if capacity == 128 else model.runner.new_state(1, capacity)
        assert st.capacity == capacity
        model.step(st, rand_ids(37, seed=5)[None])
        feed = {"input_ids": np.asarray([[7]]), **{e["input"]: st[e["name"]] for e in g["state"]}}
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, feed)))
        for e in g["state"]:
            if "output" in e:
                assert res[e["output"]].shape == (1,)
                continue
            rows, index = res[e["rows"]], res[e["index"]]
            assert rows.shape == (1, 1) + st[e["name"]].shape[2:] and index.shape == (1, 1), e["name"]
            assert 0 <= index.min() and index.max() < st[e["name"]].shape[1]
        shapes[capacity] = {n: v.shape for n, v in res.items()}
        assert st["L1.entries"].shape[1] == capacity // 4 + 1
    assert shapes[128] == shapes[CONTEXT]


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
    assert man["format"] == "dsv4-onnx" and man["version"] == 3 and man["max_len"] == CONTEXT
    assert man["dtype"] == "float32" and man["weights"] == "quantized" and man["source"] == str(tiny_dir.resolve())
    assert {"linears", "experts", "float", "compute"} <= set(man["quantization"])
    assert man["data"]["bytes"] == (out / "model.onnx.data").stat().st_size
    assert json.loads((out / "config.json").read_text()) == man["config"]
    assert man["config"]["max_position_embeddings"] == CONTEXT
    assert (out / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert man["capacity"] == {"min": 128, "multiple": 128}
    state = {e["name"]: e for e in man["graphs"]["main"]["state"]}
    assert state["start"]["output"] == "present.start" and state["start"]["grows"] == 0
    assert all(e["fill"] == 0 for e in state.values())
    assert state["L1.entries"]["grows"] == state["L1.index.keys"]["grows"] == 4
    assert state["L2.entries"]["grows"] == 128 and state["L1.kv"]["grows"] == 0
    assert state["L1.kv"]["rows"] == "present.L1.kv.rows" and state["L1.kv"]["index"] == "present.L1.kv.index"


def test_size_estimate_and_progress(tiny_dir, tmp_path):
    seen = []
    out = export_onnx(tiny_dir, tmp_path / "o", weights="bfloat16", context=64, mtp=False,
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
    assert inits["layers.0.ffn.experts.w1"] == want and inits["layers.0.attn.wq_a.weight.T"] == want
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
    with pytest.raises(ExportError, match="weights must be one of"):
        export_onnx(tiny_dir, tmp_path / "a", weights="int8", context=64)
    with pytest.raises(ExportError, match="context must be in"):
        export_onnx(tiny_dir, tmp_path / "b", context=10 ** 9)
    shutil.rmtree(tmp_path / "full")


def test_recorder_refuses_reads_after_writes_and_size_comparisons():
    """The export enforces the graph's state contract: a buffer is read before its rows are written, and a
    run-time size is never compared as a Python value."""
    g = Graph("t")
    o = OnnxOps(g)
    g.add_input("buf", FLOAT, [2, 5, 3])
    buf = Sym(g, "buf", (2, 5, 3), FLOAT)
    written = o.write_rows(buf, o.zeros((2, 1), "int"), o.zeros((2, 1, 3)))
    with pytest.raises(TraceError, match="read after write_rows"):
        o.gather_rows(written, o.zeros((2, 1), "int"))
    with pytest.raises(TraceError, match="written twice"):
        o.write_rows(written, o.zeros((2, 1), "int"), o.zeros((2, 1, 3)))
    with pytest.raises(TraceError):
        min(4, g.dim_of(buf, 1))

"""The quantized export (the default): the checkpoint's FP8/FP4 bytes in the data file, decoded in the graph
exactly, kept quantized by onnxruntime at session load, and a MoE that runs only the picked experts."""

import collections
import json

import numpy as np
import onnx
import pytest

import onnxruntime as ort

import dsv4
from dsv4.export import export_onnx
from dsv4.portable.checkpoint import Checkpoint
from dsv4.portable.config import ModelConfig, preset
from dsv4.portable.tiny import write_checkpoint

CONTEXT = 512          # state capacity of the test exports (shared with test_onnx_export)


def initializers(path):
    return {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_data_is_the_checkpoints_bytes(tiny_any, onnx_export):
    out = onnx_export(tiny_any, CONTEXT)
    data = (out / "model.onnx.data").stat().st_size
    stored = Checkpoint(tiny_any).nbytes()
    assert stored <= data <= 1.3 * stored
    dense = onnx_export(tiny_any, CONTEXT, "float32")
    assert (dense / "model.onnx.data").stat().st_size > 3 * data


def test_weights_keep_their_stored_types(tiny_dir, onnx_export):
    inits = initializers(onnx_export(tiny_dir, CONTEXT) / "model.onnx")
    T = onnx.TensorProto
    cfg = ModelConfig.from_file(tiny_dir)
    q = Checkpoint(tiny_dir).quant_weight("layers.0.attn.wq_a")
    codes = inits["layers.0.attn.wq_a.weight.T"]
    assert codes.data_type == T.FLOAT8E4M3FN and list(codes.dims) == list(q.shape[::-1])
    assert inits["layers.0.attn.wq_a.scale"].data_type == T.UINT8
    bank = inits["layers.0.ffn.experts.w1.weight"]
    assert bank.data_type == T.UINT8
    assert list(bank.dims) == [cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size // 2]
    assert list(inits["layers.0.ffn.experts.w1.scale"].dims) == [cfg.n_routed_experts, cfg.moe_intermediate_size,
                                                                 cfg.hidden_size // 32]
    assert inits["embed.weight"].data_type == T.BFLOAT16 and inits["layers.0.hc_attn_fn"].data_type == T.FLOAT


def test_logits_equal_the_float32_export_and_the_reference(tiny_any, onnx_export, rand_ids):
    """Decoding is exact, so the quantized graph computes what the dense float32 one does (only the
    accumulation order of a few ops may differ), within the runner's bound of the float64 reference."""
    ids = rand_ids(150, seed=41)
    quant = dsv4.load(onnx_export(tiny_any, CONTEXT), backend="onnx", context=CONTEXT)
    dense = dsv4.load(onnx_export(tiny_any, CONTEXT, "float32"), backend="onnx", context=CONTEXT)
    ref = dsv4.load(tiny_any, backend="reference", dtype="float64", context=CONTEXT).forward(ids)
    got, want = quant.forward(ids), dense.forward(ids)
    scale = np.abs(ref).max(-1)
    assert (np.abs(got - want).max(-1) / scale).max() <= 1e-5
    assert (np.abs(got - ref).max(-1) / scale).max() <= 1e-4
    assert greedy(quant, ids[:20], 12) == greedy(dense, ids[:20], 12)


def greedy(model, prompt, n):
    state, ids, out = model.new_state(), np.asarray([prompt]), []
    for _ in range(n):
        logits, state = model.step(state, ids)
        out.append(int(np.argmax(logits[0, -1])))
        ids = np.asarray([[out[-1]]])
    return out


def test_onnxruntime_keeps_the_weights_quantized_at_load(tiny_dir, onnx_export, tmp_path):
    """The session's optimized graph still holds every FP8 code tensor and expert bank as stored (a folded
    decode would have replaced them by float32 initializers), and still decodes with DequantizeLinear (the
    FP8 block-scale bytes, 1/16384 of their weights, may be folded to float32)."""
    out = onnx_export(tiny_dir, CONTEXT)
    ours = initializers(out / "model.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
    ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    kept = {t.name: t.data_type for t in opt.graph.initializer}
    T = onnx.TensorProto
    quantized = [n for n, t in ours.items() if t.data_type == T.FLOAT8E4M3FN or ".ffn.experts." in n]
    assert len(quantized) > 20
    assert all(kept.get(n) == ours[n].data_type for n in quantized)
    dq = sum(n.op_type == "DequantizeLinear" for n in opt.graph.node)
    assert dq == sum(ours[n].data_type == T.FLOAT8E4M3FN for n in ours)


def _expert_gemms(out, ids, state_feed):
    """Expert matmuls (Gemm in the MoE Loop bodies) one session run executes, from onnxruntime's profile."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(out.parent / f"prof-{out.name}")
    sess = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"input_ids": ids, **state_feed})
    events = json.loads(open(sess.end_profiling()).read())
    ops = collections.Counter(e["args"].get("op_name") for e in events
                              if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    return ops["Gemm"], ops["Loop"]


def test_moe_runs_only_the_picked_experts(tiny_dir, onnx_export, rand_ids):
    """A one-token step runs k experts per MoE layer (3 Gemms each), not all E; a prefill at most the
    distinct experts its tokens picked."""
    cfg = ModelConfig.from_file(tiny_dir)
    out = onnx_export(tiny_dir, CONTEXT)
    model = dsv4.load(out, backend="onnx", context=CONTEXT)
    entries = model.runner.manifest["graphs"]["main"]["state"]
    st = model.new_state()
    feed = {e["input"]: st[e["name"]] for e in entries}
    layers, k, E = cfg.num_hidden_layers, cfg.num_experts_per_tok, cfg.n_routed_experts
    assert k < E
    gemms, loops = _expert_gemms(out, np.asarray([[7]]), feed)
    assert loops == layers and gemms == 3 * k * layers
    gemms, _ = _expert_gemms(out, rand_ids(40, seed=3)[None], feed)
    assert 3 * k * layers < gemms <= 3 * E * layers
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "Loop" for n in graph.node) == layers
    assert not any(n.op_type == "Gemm" for n in graph.node)          # every expert matmul is in a Loop body


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A -Base-style tiny checkpoint: FP8 block-quantized experts with float32 scales."""
    cfg = ModelConfig.from_dict({**preset("tiny").to_dict(), "expert_dtype": "fp8"})
    return write_checkpoint(cfg, tmp_path_factory.mktemp("base"), seed=3)


def test_fp8_experts_with_float32_scales(base_ckpt, tmp_path, rand_ids):
    out = export_onnx(base_ckpt, tmp_path / "q", context=256)
    assert initializers(out / "model.onnx")["layers.0.ffn.experts.w1.scale"].data_type == onnx.TensorProto.FLOAT
    ids = rand_ids(60, seed=7)
    ref = dsv4.load(base_ckpt, backend="reference", dtype="float64", context=256).forward(ids)
    got = dsv4.load(out, backend="onnx", context=256).forward(ids)
    assert (np.abs(got - ref).max(-1) / np.abs(ref).max(-1)).max() <= 1e-4
    stored = Checkpoint(base_ckpt).nbytes()
    assert stored <= (out / "model.onnx.data").stat().st_size <= 1.3 * stored


def test_cli_export_weights_option(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from dsv4.cli.main import app
    out = tmp_path / "half"
    r = CliRunner().invoke(app, ["export", "onnx", str(tiny_dir), str(out), "--weights", "bfloat16", "--context", "64",
                                 "--no-mtp"])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["weights"] == man["dtype"] == "bfloat16"
    assert r.stderr.splitlines()[-1].startswith(f"wrote {out} (bfloat16 weights, ")
    r = CliRunner().invoke(app, ["export", "onnx", str(tiny_dir), str(tmp_path / "bad"), "--weights", "int4"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: export weights must be one of quantized, float32, float16, "
                                                 "bfloat16, got 'int4'")

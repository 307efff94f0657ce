"""`dsv4 info` and `dsv4 bench` on the tiny checkpoint, checked against the library's own numbers."""

from .cli_helpers import AUTO_CPU, error_line, json_out

from dsv4.portable.cache import state_bytes
from dsv4.portable.checkpoint import Checkpoint
from dsv4.portable.config import ModelConfig, preset


def test_info_json_numbers(dsv4_cli, tiny_dir):
    out = json_out(dsv4_cli("info", "--model", tiny_dir, "--context", 300, "--json"))
    cfg = ModelConfig.from_file(tiny_dir)
    ckpt = Checkpoint(tiny_dir)
    assert out["parameters"] == cfg.param_counts()
    assert sum(out["weight_bytes"].values()) == sum(ckpt.spec(n).nbytes for n in ckpt.names())
    assert out["weight_bytes"]["I8"] > 0 and out["weight_bytes"]["F8_E4M3"] > 0
    assert out["state_bytes"] == {"bf16": state_bytes(cfg, 300, "bf16"), "deploy": state_bytes(cfg, 300, "deploy")}
    counts = {}
    for row in out["layers"]:
        counts[row["kind"]] = counts.get(row["kind"], 0) + row["count"]
    assert counts == {"window": 2, "csa": 2, "hca": 2, "mtp": 1}
    rows = {r["backend"]: r for r in out["memory"]}
    assert rows["reference"]["installed"] and rows["reference"]["total"] > rows["reference"]["weights"] > 0


def test_info_table_and_a_preset_without_weights(dsv4_cli, tiny_dir):
    r = dsv4_cli("info", "--model", tiny_dir)
    assert r.exit_code == 0, r.output
    for title in ("configuration", "layers", "parameters and weights", "state (KV cache)", "memory estimate"):
        assert title in r.stdout
    flash = json_out(dsv4_cli("info", "--model", "flash", "--json"))
    assert flash["parameters"] == preset("flash").param_counts()
    assert flash["state_bytes_per_token"]["deploy"] > 3000


def test_info_errors(dsv4_cli, tmp_path):
    r = dsv4_cli("info", "--model", tmp_path)
    assert r.exit_code == 3
    assert error_line(r) == (f"error: {tmp_path} has no config.json; a model directory is a checkpoint "
                             f"(config.json + *.safetensors + tokenizer.json) or an ONNX export (manifest.json "
                             f"+ model.onnx)")
    r = dsv4_cli("info", "--model", "pro", "--context", 0)
    assert r.exit_code == 2 and error_line(r) == "error: --context must be ≥ 1, got 0"


def test_bench_json(dsv4_cli, model_args):
    out = json_out(dsv4_cli("bench", *model_args, "--prompt-tokens", 40, "--gen-tokens", 4,
                            "--prefill-chunk", 16, "--json"))
    assert out["backend"] == AUTO_CPU and out["prompt_tokens"] == 40 and out["gen_tokens"] == 4
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0
    assert abs(out["prefill_tok_s"] - 40 / out["prefill_s"]) < 0.05 * out["prefill_tok_s"]
    assert out["peak_rss_bytes"] > 50 << 20


def test_bench_table_and_context_error(dsv4_cli, model_args, tiny_dir):
    r = dsv4_cli("bench", *model_args, "-p", 8, "-g", 2)
    assert r.exit_code == 0, r.output
    assert "prefill" in r.stdout and "decode" in r.stdout and "peak RSS" in r.stdout
    r = dsv4_cli("bench", "--model", tiny_dir, "--context", 32, "-p", 40, "-g", 4)
    assert r.exit_code == 2 and error_line(r) == "error: --context 32 is too small for 40 + 4 tokens"


def test_info_builds_the_schema_once(dsv4_cli, monkeypatch):
    """`dsv4 info --model flash` used to rebuild the 69k-tensor schema ten times (4.5 s; Pro 78 s)."""
    from dsv4.portable import checkpoint
    calls = []
    build = checkpoint._build_schema
    monkeypatch.setattr(checkpoint, "_SCHEMAS", {})
    monkeypatch.setattr(checkpoint, "_build_schema", lambda cfg: calls.append(cfg.hidden_size) or build(cfg))
    flash = json_out(dsv4_cli("info", "--model", "flash", "--json"))
    assert calls == [4096]
    rows = {r["backend"]: r for r in flash["memory"]}
    # the estimates follow the backends' holdings: FP8/FP4 kept on mlx and cuda (float32 scales there),
    # every linear dense in an export
    stored = sum(flash["weight_bytes"].values())
    assert stored < rows["mlx"]["weights"] < 1.02 * stored < rows["cuda"]["weights"] < 5 * stored
    assert rows["onnx"]["weights"] > 5 * stored


def test_info_check_passes_a_healthy_checkpoint(dsv4_cli, tiny_dir):
    """`--check` scans the values and the tokenizer; a sound checkpoint has nothing to report."""
    out = json_out(dsv4_cli("info", "--model", tiny_dir, "--check", "--json"))
    assert out["problems"] == [] and out["format"] == "official"

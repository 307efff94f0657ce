"""`dsv4 convert`, `dsv4 export`, `dsv4 serve`: flag validation, missing extras, and a real export."""

import json
import sys

import pytest
from cli_helpers import error_line


@pytest.mark.parametrize("args,message", [
    (["--to", "gguf"], "error: --to must be one of mlx, got 'gguf'"),
    (["--bits", "3"], "error: --bits must be 4 or 8, got 3"),
    (["--q-mode", "nf4"], "error: --q-mode must be affine or mxfp4, got 'nf4'"),
])
def test_convert_flag_errors(dsv4_cli, tiny_dir, tmp_path, args, message):
    r = dsv4_cli("convert", tiny_dir, tmp_path / "out", *args)
    assert r.exit_code == 2 and error_line(r) == message


def test_convert_without_the_mlx_extra(dsv4_cli, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dsv4.backends.mlx.convert", None)      # import now raises ImportError
    r = dsv4_cli("convert", tiny_dir, tmp_path / "out", "--to", "mlx")
    assert r.exit_code == 4
    assert error_line(r).startswith("error: converting for MLX needs the mlx extra (")
    assert r.stderr.strip().endswith("pip install 'dsv4[mlx]'")


def test_export_errors(dsv4_cli, tiny_dir, tmp_path, monkeypatch):
    r = dsv4_cli("export", "tflite", tiny_dir, tmp_path / "out")
    assert r.exit_code == 2 and error_line(r) == "error: FORMAT must be one of onnx, got 'tflite'"
    r = dsv4_cli("export", "onnx", tmp_path / "missing", tmp_path / "out")
    assert r.exit_code == 3 and error_line(r).startswith("error: model directory not found: ")
    monkeypatch.setitem(sys.modules, "dsv4.export", None)
    r = dsv4_cli("export", "onnx", tiny_dir, tmp_path / "out")
    assert r.exit_code == 4 and error_line(r).endswith("pip install 'dsv4[onnx]'")


def test_export_onnx_writes_a_loadable_directory(dsv4_cli, tiny_dir, tmp_path):
    pytest.importorskip("onnx")
    out = tmp_path / "onnx"
    r = dsv4_cli("export", "onnx", tiny_dir, out, "--context", 64, "--no-mtp")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_len"] == 64 and "mtp" not in manifest["graphs"]
    again = dsv4_cli("export", "onnx", tiny_dir, out)
    assert again.exit_code == 2
    assert error_line(again) == f"error: {out} exists and is not empty; choose another output directory"
    info = json.loads(dsv4_cli("info", "--model", out, "--json").stdout)
    assert info["format"] == "onnx" and [m["backend"] for m in info["memory"] if m["usable"]] == ["onnx"]


def test_serve_without_the_server(dsv4_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "dsv4.cli.serve", None)
    r = dsv4_cli("serve", "--port", 8123)
    assert r.exit_code == 4
    assert error_line(r).startswith("error: the server needs the serve extra (")
    r = dsv4_cli("serve", "--port", 70000)
    assert r.exit_code == 2 and error_line(r) == "error: --port must be in 1..65535, got 70000"

"""`dsv4 convert`, `dsv4 export`, `dsv4 serve`: flag validation, missing extras, and a real export."""

import importlib.util
import json
import socket
import subprocess
import sys
import time

import pytest
from .cli_helpers import error_line

from dsv4.cli.resolve import DEMO_NOTICE
from dsv4.portable.install import install_command


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
    assert r.stderr.strip().endswith(install_command("mlx"))


@pytest.mark.parametrize("command", [["convert"], ["export", "onnx"]])
def test_a_missing_source_is_named_as_the_positional_model(dsv4_cli, tmp_path, command):
    """convert and export take MODEL as an argument: the hint must not suggest `--model demo`."""
    missing = tmp_path / "missing"
    r = dsv4_cli(*command, missing, tmp_path / "out")
    line = error_line(r)
    assert r.exit_code == 3 and line.startswith(f"error: model directory not found: {missing} (pass a ")
    assert "--model" not in line and " demo" in line


def test_export_errors(dsv4_cli, tiny_dir, tmp_path, monkeypatch):
    r = dsv4_cli("export", "tflite", tiny_dir, tmp_path / "out")
    assert r.exit_code == 2 and error_line(r) == "error: FORMAT must be one of onnx, got 'tflite'"
    monkeypatch.setitem(sys.modules, "dsv4.export", None)
    r = dsv4_cli("export", "onnx", tiny_dir, tmp_path / "out")
    assert r.exit_code == 4 and error_line(r).endswith(install_command("onnx"))


def test_convert_says_which_formats_it_wrote_on_one_unwrapped_line(dsv4_cli, tiny_dir, tmp_path):
    """The default mixes mxfp4 (experts) and mxfp8 (the FP8 weights) and says so; the copy-paste command
    stays on the same line however long the path (the runner's output is not a terminal)."""
    pytest.importorskip("mlx.core")
    out = tmp_path / ("a-rather-long-directory-name-" * 3) / "tiny-mlx"
    r = dsv4_cli("convert", tiny_dir, out)
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[-1] == (f"wrote {out} (experts mxfp4, other linears mxfp8); run it with: "
                                         f"dsv4 chat --model {out}")
    affine = tmp_path / "affine"
    r = dsv4_cli("convert", tiny_dir, affine, "--q-mode", "affine", "--bits", 4)
    assert r.exit_code == 0 and f"wrote {affine} (experts affine 4-bit, other linears affine 4-bit)" in r.stderr


def test_converted_and_exported_demos_keep_the_demo_note(dsv4_cli, tmp_path):
    made = []
    if importlib.util.find_spec("mlx") is not None:
        assert dsv4_cli("convert", "demo", tmp_path / "mlx").exit_code == 0
        made.append(tmp_path / "mlx")
    if importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None:
        assert dsv4_cli("export", "onnx", "demo", tmp_path / "onnx", "--context", 64, "--no-mtp").exit_code == 0
        made.append(tmp_path / "onnx")
    if not made:
        pytest.skip("needs the mlx or the onnx extra")
    for path in made:
        r = dsv4_cli("generate", "Hello", "--model", path, "-n", 1, "--context", 64, "--json")
        assert r.exit_code == 0, r.output
        assert r.stderr.splitlines()[0] == DEMO_NOTICE


def test_a_real_checkpoint_gets_no_demo_note(dsv4_cli, model_args):
    r = dsv4_cli("generate", "Hello", *model_args, "-n", 1, "--json")
    assert r.exit_code == 0 and "random weights" not in r.stderr


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


def test_serve_without_the_serve_extra(dsv4_cli, monkeypatch):
    """uvicorn missing (the real failure, not a stubbed module): one `error:` line, exit 4, the install
    command; bad flags are refused first."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.delitem(sys.modules, "dsv4.cli.serve", raising=False)
    r = dsv4_cli("serve", "--port", 8123)
    assert r.exit_code == 4
    assert error_line(r) == (f"error: the server needs the serve extra (uvicorn is missing): "
                             f"{install_command('serve')}")
    r = dsv4_cli("serve", "--port", 70000)
    assert r.exit_code == 2 and error_line(r) == "error: --port must be in 1..65535, got 70000"
    r = dsv4_cli("serve", "--log-level", "loud")
    assert r.exit_code == 2
    assert error_line(r) == "error: --log-level must be one of debug, info, warning, error, got 'loud'"


def test_serve_on_a_busy_port_fails_before_loading(dsv4_cli, tiny_dir, monkeypatch):
    serve = pytest.importorskip("dsv4.cli.serve")
    monkeypatch.setattr(serve, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = dsv4_cli("serve", "--model", tiny_dir, "--port", port)
    assert r.exit_code == 2
    assert error_line(r) == (f"error: cannot listen on 127.0.0.1:{port}: address already in use; "
                             f"choose another --port or --host")


def test_serve_answers_on_the_port_it_took(tiny_dir):
    """The whole command in a subprocess: it listens on the socket it bound before loading."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("dsv4.cli.serve")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4.cli", "serve", "--model", str(tiny_dir), "--context", "64",
                             "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == [tiny_dir.name]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)

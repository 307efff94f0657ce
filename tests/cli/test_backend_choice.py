"""Which backend `--backend` gets: `auto` never picks torch on a machine without a GPU, and asking for cuda
there says, on one stderr line, that it will run on the CPU."""

import itertools

import pytest
from .cli_helpers import json_out

from dsv4.cli import resolve

WARNING = ("warning: no CUDA GPU is visible, so the cuda backend runs torch on the CPU (slow); "
           "--backend auto picks the fastest backend here")


@pytest.mark.parametrize("installed", [set(c) for n in (1, 2, 3) for c in itertools.combinations(
    ("reference", "mlx", "cuda"), n) if set(c) != {"cuda"}])
def test_auto_never_picks_cuda_without_a_gpu(monkeypatch, tiny_dir, installed):
    monkeypatch.setattr(resolve, "gpu_visible", lambda: False)
    monkeypatch.setattr(resolve, "apple_silicon", lambda: False)
    monkeypatch.setattr(resolve, "backend_available", lambda name: name in installed)
    assert resolve.pick_backend("auto", tiny_dir) in installed - {"cuda"}


def test_auto_picks_cuda_with_a_gpu(monkeypatch, tiny_dir):
    monkeypatch.setattr(resolve, "gpu_visible", lambda: True)
    monkeypatch.setattr(resolve, "apple_silicon", lambda: False)
    monkeypatch.setattr(resolve, "backend_available", lambda name: True)
    assert resolve.pick_backend("auto", tiny_dir) == "cuda"


def test_cuda_without_a_gpu_warns_once(monkeypatch, tiny_dir, capsys):
    monkeypatch.setattr(resolve, "gpu_visible", lambda: False)
    monkeypatch.setattr(resolve, "get_backend", lambda name: None)        # torch need not be installed
    assert resolve.pick_backend("cuda", tiny_dir) == "cuda"
    assert capsys.readouterr().err == WARNING + "\n"
    monkeypatch.setattr(resolve, "gpu_visible", lambda: True)
    assert resolve.pick_backend("cuda", tiny_dir) == "cuda"
    assert capsys.readouterr().err == ""


def test_generate_on_cuda_without_a_gpu(dsv4_cli, model_args):
    """The whole command on torch's CPU build: the warning is the only stderr line, the answer still comes."""
    pytest.importorskip("torch")
    if resolve.gpu_visible():
        pytest.skip("a GPU is visible")
    r = dsv4_cli("generate", "Hello", *model_args, "--backend", "cuda", "-n", 2, "--json")
    assert r.stderr.splitlines() == [WARNING]
    assert json_out(r)["backend"] == "cuda"


def test_auto_picks_the_cpu_backend_on_a_machine_without_gpu_or_mac(monkeypatch, tiny_dir):
    """The stored-format CPU kernels first, whatever else is installed; the reference without numba."""
    monkeypatch.setattr(resolve, "gpu_visible", lambda: False)
    monkeypatch.setattr(resolve, "apple_silicon", lambda: False)
    monkeypatch.setattr(resolve, "backend_available", lambda name: True)
    assert resolve.pick_backend("auto", tiny_dir) == "cpu"
    monkeypatch.setattr(resolve, "backend_available", lambda name: name != "cpu")
    assert resolve.pick_backend("auto", tiny_dir) == "reference"


def test_threads_reach_the_cpu_backend(tiny_dir, dsv4_cli, model_args):
    pytest.importorskip("numba")
    assert resolve.load_model(str(tiny_dir), "cpu", threads=1, quiet=True).runner.threads == 1
    assert resolve.load_model(str(tiny_dir), "reference", threads=1, quiet=True).backend == "reference"
    r = dsv4_cli("generate", "Hello", *model_args, "--threads", 0)
    assert r.exit_code != 0 and r.stderr.strip() == "error: --threads must be at least 1, got 0"

"""`dsv4 parity`: the reference float32 passes its bounds; a perturbed backend fails (exit 1)."""

import numpy as np
import pytest
from .cli_helpers import error_line, json_out

from dsv4.portable import runtime
from dsv4.portable.install import install_command
from dsv4.portable.reference import make_runner as reference_runner

FLAGS = ["--tokens", 40, "--gen-tokens", 4, "--json"]


def test_reference_float32_passes(dsv4_cli, tiny_dir):
    out = json_out(dsv4_cli("parity", "--model", tiny_dir, "--backend", "reference", *FLAGS))
    (row,) = out["rows"]
    assert (row["backend"], row["dtype"], row["status"]) == ("reference", "float32", "pass")
    assert 0 < row["logits_err"] <= 1e-4 and 0 < row["state_err"] <= 1e-4
    assert row["greedy"] == "4/4"


class NoisyRunner:
    """The reference runner with logits perturbed by ~1e-2 of their scale (a broken backend)."""

    def __init__(self, inner, seed):
        self.inner, self.rng = inner, np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, state, ids):
        logits, streams = self.inner.step(state, ids)
        noise = self.rng.standard_normal(logits.shape) * 1e-2 * np.abs(logits).max()
        return logits + noise.astype(logits.dtype), streams


@pytest.fixture
def noisy_backend():
    runtime.register_backend("noisy", lambda cfg, ckpt, **kw: NoisyRunner(reference_runner(cfg, ckpt, **kw),
                                                                          seed=np.random.randint(1 << 30)))
    yield "noisy"
    runtime._FACTORIES.pop("noisy", None)


def test_a_backend_outside_its_bound_fails(dsv4_cli, tiny_dir, noisy_backend):
    r = dsv4_cli("parity", "--model", tiny_dir, "--backend", "reference", "--backend", noisy_backend, *FLAGS)
    assert r.exit_code == 1, r.output
    import json
    rows = {row["backend"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["reference"]["status"] == "pass"
    assert rows["noisy"]["status"] == "fail" and rows["noisy"]["logits_err"] > 1e-3


def test_table_output_and_errors(dsv4_cli, tiny_dir):
    r = dsv4_cli("parity", "--model", tiny_dir, "--backend", "reference", "--tokens", 24, "--gen-tokens", 2)
    assert r.exit_code == 0, r.output
    assert "parity vs reference float64" in r.stdout and "pass" in r.stdout
    r = dsv4_cli("parity", "--model", tiny_dir, "--backend", "tpu")
    assert r.exit_code == 2 and error_line(r).startswith("error: unknown backend 'tpu'; choose from ")
    r = dsv4_cli("parity", "--model", tiny_dir, "--dtype", "int8")
    assert r.exit_code == 2 and error_line(r) == "error: --dtype must be one of float64, float32, bfloat16, got 'int8'"


def test_a_skipped_backend_shows_its_install_command_verbatim(dsv4_cli, tiny_dir, monkeypatch):
    """The note carries `pip install … '…[fake]'`; rich must print the brackets, not take them for markup."""
    monkeypatch.setitem(runtime._BUILTIN, "fake", "dsv4.backends.does_not_exist")
    r = dsv4_cli("parity", "--model", tiny_dir, "--backend", "fake", "--tokens", 16, "--gen-tokens", 1)
    assert r.exit_code == 0, r.output
    assert "skipped" in r.stdout and install_command("fake") in r.stdout


def test_onnx_option_needs_a_dsv4_export(dsv4_cli, tiny_dir, tmp_path):
    """--onnx names an export by its manifest's format, not by any manifest.json."""
    (tmp_path / "manifest.json").write_text('{"name": "some other tool"}')
    r = dsv4_cli("parity", "--model", tiny_dir, "--onnx", tmp_path)
    assert r.exit_code == 2 and "not a dsv4 ONNX export directory" in error_line(r)

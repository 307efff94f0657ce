"""Parallel runs equal one process: 2 and 4 ranks over gloo, 2 over mx ring, and the CLI's --parallel;
a killed rank ends the run with one line naming it, in bounded time."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import dsv4
from dsv4.cli.parallel import _rank_env

from .worker import scenario

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run_ranks(transport: str, world: int, out: Path, model: Path, backend: str, timeout: float = 240):
    """Start every rank of `tests.parallel.worker` and wait for all of them."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel.worker", str(out), str(model), backend],
                              env=dict(ENV, **env), cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for env in _rank_env(transport, world)]
    try:
        for p in procs:
            p.wait(timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [p.stderr.read() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    return dict(np.load(out))


def assert_same(got: dict, want: dict):
    assert got["greedy"].tolist() == want["greedy"].tolist()
    for k in ("prefill", "chunked", "fork", "decode"):
        scale = float(np.abs(want[k]).max())
        assert scale > 1.0                                        # real logits, not zeros
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5 * scale, err_msg=k)


@pytest.mark.parametrize("preset,world", [("tiny", 2), ("tiny2", 4)])
def test_gloo_ranks_equal_one_process(preset, world, tmp_path, tiny_dir, tiny2_dir):
    model = {"tiny": tiny_dir, "tiny2": tiny2_dir}[preset]
    got = run_ranks("torch", world, tmp_path / "out.npz", model, "cuda")
    want = scenario(dsv4.load(model, backend="cuda", dtype="float32", device="cpu"))
    assert_same(got, want)


def test_mx_ring_ranks_equal_one_process(tmp_path, tiny_dir):
    pytest.importorskip("mlx.core")
    got = run_ranks("mlx", 2, tmp_path / "out.npz", tiny_dir, "mlx")
    want = scenario(dsv4.load(tiny_dir, backend="mlx", dtype="float32"))
    assert_same(got, want)


def _dsv4(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "dsv4", *args], env=dict(ENV, **(env or {})), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_parallel_generate_equals_one_process():
    args = ["generate", "--model", "tiny", "--backend", "cuda", "--dtype", "float32", "-n", "12", "--json", "hello"]
    outs = []
    for extra in ([], ["--parallel", "2"]):
        p = _dsv4(*args, *extra)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert outs[1]["content"] == outs[0]["content"]
    for k in ("prompt_tokens", "completion_tokens"):
        assert outs[1]["usage"][k] == outs[0]["usage"][k]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _signal_follower_mid_answer(backend: str, sig: int, env=None):
    """Start a streaming 2-rank `generate`, send `sig` to the follower once the answer flows, and return
    (exit code, stderr, seconds rank 0 took to end after the signal)."""
    p = _dsv4("generate", "--model", "tiny", "--backend", backend, "--dtype", "float32", "--parallel", "2",
              "-n", "4000", "--context", "4096", "hello", env=env)
    try:
        first = p.stdout.read(1)                      # the answer is streaming: both ranks are stepping
        assert first, p.stderr.read()
        (follower,) = _children(p.pid)
        os.kill(follower, sig)
        t0 = time.monotonic()
        p.wait(30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, p.stderr.read(), took


def test_killed_rank_ends_the_run_naming_it():
    code, err, took = _signal_follower_mid_answer("cuda", signal.SIGKILL)
    assert code != 0
    assert "error: rank 1 of 2 was killed by signal 9; ending all ranks" in err, err
    assert "Traceback" not in err
    assert took < 10


def test_hung_mx_peer_ends_the_run_after_the_collective_timeout():
    """mx.distributed's collectives never time out: rank 0 times each step and ends the run."""
    pytest.importorskip("mlx.core")
    code, err, took = _signal_follower_mid_answer("mlx", signal.SIGSTOP, {"DSV4_COLLECTIVE_TIMEOUT": "4"})
    assert code != 0 and "Traceback" not in err, err
    assert "waited more than 4 s for the other ranks" in err and "ending all 2 ranks" in err, err
    assert took < 15


def test_rank_zero_gone_ends_the_followers():
    p = _dsv4("generate", "--model", "tiny", "--backend", "cuda", "--dtype", "float32", "--parallel", "2",
              "-n", "4000", "--context", "4096", "hello")
    try:
        assert p.stdout.read(1)
        (follower,) = _children(p.pid)
        p.kill()
        p.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{follower}").exists() and time.monotonic() < deadline:
            with open(f"/proc/{follower}/stat") as f:
                if f.read().split()[2] == "Z":        # ended, not yet reaped (its parent is gone too)
                    break
            time.sleep(0.1)
        alive = Path(f"/proc/{follower}").exists() and open(f"/proc/{follower}/stat").read().split()[2] != "Z"
        assert not alive, "the follower outlived rank 0"
    finally:
        if p.poll() is None:
            p.kill()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _serve_answers(extra: list) -> list:
    """Two concurrent greedy chat completions (batched decode) from `dsv4 serve` on the tiny model."""
    import socket
    import threading
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _dsv4("serve", "--model", "tiny", "--backend", "cuda", "--dtype", "float32", "--port", str(port),
              "--log-level", "warning", *extra)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        deadline = time.monotonic() + 120
        while True:
            try:
                _post(url, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
                break
            except (ConnectionError, urllib.error.URLError) as e:
                assert not isinstance(e, urllib.error.HTTPError), e.read()
                assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() else "no server"
                time.sleep(0.3)
        answers = [None, None]

        def ask(i):
            answers[i] = _post(url, {"model": "tiny",
                                     "messages": [{"role": "user", "content": ["red lamp", "blue orbit"][i]}],
                                     "max_tokens": 10, "temperature": 0})["choices"][0]["message"]["content"]
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return answers
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_server_batches_unchanged_on_two_ranks():
    one = _serve_answers([])
    two = _serve_answers(["--parallel", "2"])
    assert all(one) and two == one


def test_ctrl_c_ends_all_ranks():
    """Ctrl-C reaches the whole process group: rank 0 stops between steps (exit 130), followers follow."""
    p = subprocess.Popen([sys.executable, "-m", "dsv4", "generate", "--model", "tiny", "--backend", "cuda",
                          "--dtype", "float32", "--parallel", "2", "-n", "4000", "--context", "4096", "hello"],
                         env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stdout.read(1)
        (follower,) = _children(p.pid)
        os.killpg(p.pid, signal.SIGINT)
        p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    assert "Traceback" not in p.stderr.read()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{follower}").exists() and "Z" not in Path(f"/proc/{follower}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the follower outlived rank 0"
        time.sleep(0.1)

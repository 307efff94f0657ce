"""Issue 13 item 1: one large request must not stall or exhaust the server.  A body above the limit is
refused at once (declared or chunked) while /health keeps answering; a prompt provably longer than
the context is refused before it is tokenized, and one that fits is never refused by that bound;
tokenizing happens off the event loop."""

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx

from ..cli_helpers import error_line
from .server_helpers import API_KEY, ScriptedModel, live, random_text, serve_configs

from dsv4.cli.server import build_app
from dsv4.cli.server.intake import Limits, default_max_body, host_name, hosts_for_bind

OK = {"Authorization": f"Bearer {API_KEY}"}
LIMIT = 1_000_000


class CountingTokenizer:
    """The real tokenizer, counting the calls that tokenize text (optionally slowed down)."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self._tokenizer, self.delay, self.calls = tokenizer, delay, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def _count(self):
        self.calls += 1
        time.sleep(self.delay)

    def encode(self, text):
        self._count()
        return self._tokenizer.encode(text)

    def encode_prompt(self, prompt):
        self._count()
        return self._tokenizer.encode_prompt(prompt)


def _app(demo_model, tokenizer=None, context=512):
    model = ScriptedModel(tokenizer or demo_model.tokenizer, context=context)
    return build_app(model, model_name="s", api_key=API_KEY, max_body=LIMIT)


def _read_response(sock) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_oversized_body_is_refused_at_once_and_health_answers(demo_model):
    with live(_app(demo_model)) as url, httpx.Client(base_url=url, timeout=5) as client:
        where = urlsplit(url)
        with socket.create_connection((where.hostname, where.port)) as sock:
            sock.settimeout(1.0)
            started = time.monotonic()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50000000\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n" +
                         b"x" * 200_000)                        # 50 MB announced, the rest never sent
            health = client.get("/health", timeout=1.0)
            response = _read_response(sock)
            elapsed = time.monotonic() - started
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert response.startswith(b"HTTP/1.1 413") and elapsed < 1.0, (elapsed, response[:200])
        error = json.loads(response.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "request_too_large" and "50,000,000" in error["message"]

        def chunks():                                           # no Content-Length: counted as it comes
            for _ in range(40):
                yield b"x" * 50_000
        started = time.monotonic()
        r = client.post("/v1/messages", content=chunks(), headers={**OK, "content-type": "application/json"})
        assert r.status_code == 413 and time.monotonic() - started < 1.0
        assert r.json()["error"]["type"] == "request_too_large"
        small = {"model": "s", "max_tokens": 2, "messages": [{"role": "user", "content": random_text()}]}
        assert client.post("/v1/messages", json=small, headers=OK).status_code == 200   # same client, still served


def test_length_bound_refuses_before_tokenizing_and_never_refuses_what_fits(demo_model):
    counting = CountingTokenizer(demo_model.tokenizer)
    with live(_app(demo_model, counting)) as url, httpx.Client(base_url=url, headers=OK, timeout=30) as client:
        long = "a" * 70_000                                     # ≥ 70,000 / 128 > 512 tokens, surely
        requests = [("/v1/chat/completions", {"model": "s", "messages": [{"role": "user", "content": long}]}),
                    ("/v1/completions", {"model": "s", "prompt": long}),
                    ("/v1/messages/count_tokens", {"model": "s", "messages": [{"role": "user", "content": long}]})]
        for path, body in requests:
            r = client.post(path, json=body)
            assert r.status_code == 400 and "at least" in r.text and "512" in r.text, r.text
        assert counting.calls == 0, "a provably too long prompt was tokenized"
        fits = "word " * 150                                    # 750 bytes > 512, but ~150 tokens
        r = client.post("/v1/completions", json={"model": "s", "prompt": fits, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < 512
        count = client.post("/v1/messages/count_tokens",
                            json={"model": "s", "messages": [{"role": "user", "content": fits}]})
        assert count.status_code == 200 and count.json()["input_tokens"] < 512
        over = client.post("/v1/messages/count_tokens",                  # fits the bound, not the context
                           json={"model": "s", "messages": [{"role": "user", "content": "word " * 600}]})
        assert over.status_code == 400 and over.json()["error"]["type"] == "invalid_request_error"


def test_tokenizing_runs_off_the_event_loop(demo_model):
    slow = CountingTokenizer(demo_model.tokenizer, delay=1.0)
    with live(_app(demo_model, slow)) as url, httpx.Client(base_url=url, headers=OK, timeout=30) as client:
        for path, body in (("/v1/completions", {"model": "s", "prompt": random_text(), "max_tokens": 1}),
                           ("/v1/messages/count_tokens",
                            {"model": "s", "messages": [{"role": "user", "content": random_text()}]})):
            done = {}
            worker = threading.Thread(target=lambda: done.update(r=client.post(path, json=body)))
            worker.start()
            deadline = time.monotonic() + 10
            while slow.calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            assert httpx.get(url + "/health", timeout=1.0).status_code == 200
            assert time.monotonic() - started < 0.5, "/health waited for the tokenizer"
            worker.join(30)
            assert done["r"].status_code == 200
            slow.calls = 0


def test_default_limits():
    assert default_max_body(384) == 4_000_000 and default_max_body(1_048_576) == 16 * 1_048_576
    assert hosts_for_bind("127.0.0.1") == hosts_for_bind("::1") == hosts_for_bind("localhost")
    assert "localhost" in hosts_for_bind("127.0.0.1") and hosts_for_bind("0.0.0.0") == ("*",)
    assert hosts_for_bind("192.168.1.5") == ("192.168.1.5",)
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "::1", "example.com.", "10.0.0.1")] == \
        ["localhost", "::1", "::1", "example.com", "10.0.0.1"]


def test_serve_flags_reach_the_server(dsv4_cli, demo_model, monkeypatch):
    for args, line in ((["--max-body-mb", "0"], "error: --max-body-mb must be > 0, got 0"),
                       (["--read-timeout", "-1"], "error: --read-timeout must be > 0, got -1"),
                       (["--allowed-hosts", " , "], "error: --allowed-hosts needs at least one name (or * for any)")):
        r = dsv4_cli("serve", *args)
        assert r.exit_code == 2 and error_line(r) == line
    run, configs = serve_configs(dsv4_cli, demo_model, monkeypatch)
    r = run("--max-body-mb", "2.5", "--read-timeout", "5", "--allowed-hosts", "a.example, b")
    assert r.exit_code == 0, r.output
    assert configs[-1].app.state.server.limits == Limits(2_500_000, 5.0, ("a.example", "b"))
    assert configs[-1].http.header_timeout == 5.0
    assert run().exit_code == 0
    assert configs[-1].app.state.server.limits == Limits(default_max_body(demo_model.context), 20.0,
                                                         hosts_for_bind("127.0.0.1"))

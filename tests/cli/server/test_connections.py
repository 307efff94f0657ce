"""Issue 13 items 3 and 10: a client that leaves, or never finishes sending, costs the server a bounded
amount of work.  A non-streaming request is cancelled soon after its client disconnects although
tokens keep flowing; headers and body must arrive within the read deadline; a client that goes away
while sending is logged in one line, without a traceback."""

import logging
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from .server_helpers import API_KEY, ScriptedModel, live, random_text

from dsv4.cli.server import build_app

OK = {"Authorization": f"Bearer {API_KEY}"}
HEADERS = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer " + API_KEY.encode() + b"\r\n")


@pytest.fixture(scope="module")
def slow_server(demo_model):
    """A scripted model that takes 10 ms a step (tokens flow steadily), with a 0.5 s read deadline."""
    model = ScriptedModel(demo_model.tokenizer, context=4096, delay=0.01)
    with live(build_app(model, model_name="slow", api_key=API_KEY, read_timeout=0.5)) as url:
        yield url


def _connect(url):
    where = urlsplit(url)
    sock = socket.create_connection((where.hostname, where.port))
    sock.settimeout(3.0)
    return sock


def _read_until_closed(sock, seconds: float):
    """Everything the server sends on `sock` until it closes it, or None when it is still open after
    `seconds` (a response may arrive in several segments, so one recv is not enough)."""
    sock.settimeout(seconds)
    received, deadline = b"", time.monotonic() + seconds
    try:
        while chunk := sock.recv(65536):
            received += chunk
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
    except ConnectionResetError:
        pass
    except socket.timeout:
        return None
    return received


def _closed_within(sock, seconds: float) -> bool:
    """True when the server closes `sock` within `seconds` (what it sends before is read and dropped)."""
    return _read_until_closed(sock, seconds) is not None


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "slow", "messages": [{"role": "user", "content": "x"}]}),  # no max_tokens
    ("/v1/messages", {"model": "slow", "max_tokens": 4000, "messages": [{"role": "user", "content": "x"}]}),
])
def test_non_streaming_request_is_cancelled_when_its_client_leaves(slow_server, path, body):
    body["messages"][0]["content"] = random_text()
    before = httpx.get(slow_server + "/health").json()
    with pytest.raises(httpx.ReadTimeout):                  # the client gives up while tokens flow
        httpx.post(slow_server + path, json=body, headers=OK, timeout=httpx.Timeout(5, read=0.6))
    deadline = time.monotonic() + 3
    while (health := httpx.get(slow_server + "/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["running"] == 0, "the abandoned request is still generating"
    assert health["decode_rows"] - before["decode_rows"] < 300, "generation went on long after the client left"


def test_headers_must_arrive_in_time(slow_server):
    with _connect(slow_server) as idle:                     # opens, sends nothing
        started = time.monotonic()
        assert _closed_within(idle, 2.5) and time.monotonic() - started >= 0.4
    with _connect(slow_server) as trickle:                  # a header line every 0.1 s: never finishes
        trickle.sendall(HEADERS)
        started, closed = time.monotonic(), False
        while not closed and time.monotonic() - started < 2.5:
            try:
                trickle.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            closed = _closed_within(trickle, 0.1)
        assert time.monotonic() - started < 2.5, "a client trickling its headers kept its connection"
    assert httpx.get(slow_server + "/health").status_code == 200


def test_body_must_arrive_in_time_and_a_leaving_sender_is_one_log_line(slow_server, caplog):
    with _connect(slow_server) as sock:
        sock.sendall(HEADERS + b"Content-Length: 100\r\n\r\n" + b'{"model": ')
        started = time.monotonic()
        response = _read_until_closed(sock, 3.0)
        assert response is not None, "the connection stayed open after the body deadline"
        assert response.startswith(b"HTTP/1.1 408") and b"request_timeout" in response
        assert 0.4 <= time.monotonic() - started < 2.5
    with caplog.at_level(logging.INFO, logger="dsv4.serve"):
        with _connect(slow_server) as sock:
            sock.sendall(HEADERS + b"Content-Length: 100\r\n\r\n" + b'{"model": ')
            time.sleep(0.1)
        deadline = time.monotonic() + 3
        while not any("disconnected while sending" in r.getMessage() for r in caplog.records) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = [r for r in caplog.records if "disconnected while sending" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert not any(r.exc_info for r in caplog.records), "a disconnect was logged with a traceback"
    assert httpx.get(slow_server + "/health").status_code == 200


def test_responses_do_not_wait_for_delayed_acks(slow_server):
    """`dsv4 serve`'s socket names IPPROTO_TCP, so asyncio turns Nagle's algorithm off on its connections;
    without that, each response here waited ~40 ms for the client's delayed ACK."""
    with httpx.Client(base_url=slow_server) as client:
        client.get("/health")
        started = time.monotonic()
        for _ in range(10):
            assert client.get("/health").status_code == 200
        assert time.monotonic() - started < 0.3

"""A corpus of bad requests: each gets the right status in its API's own error format, and the server
keeps serving.  Plus the bounded queue (429) on a deliberately slow server."""

import threading
import time

import httpx
import pytest
from .server_helpers import API_KEY, ScriptedModel, live, random_text

from dsv4.cli.server import build_app

OK = {"Authorization": f"Bearer {API_KEY}"}
MSG = [{"role": "user", "content": "hello"}]


def chat(**kw):
    return {"model": "demo", "messages": MSG, "max_tokens": 4, **kw}


def anth(**kw):
    return {"model": "demo", "messages": MSG, "max_tokens": 4, **kw}


# (path, body: dict or raw bytes, headers, status, anthropic error type or OpenAI code/None)
CORPUS = [
    ("/v1/chat/completions", b"{not json", OK, 400, None),
    ("/v1/chat/completions", b"[1, 2]", OK, 400, None),
    ("/v1/chat/completions", {"messages": MSG}, OK, 400, None),
    ("/v1/chat/completions", chat(model=7), OK, 400, None),
    ("/v1/chat/completions", chat(model="gpt-9"), OK, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": "demo"}, OK, 400, None),
    ("/v1/chat/completions", chat(messages="hello"), OK, 400, None),
    ("/v1/chat/completions", chat(messages=[]), OK, 400, None),
    ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), OK, 400, None),
    ("/v1/chat/completions", chat(temperature="hot"), OK, 400, None),
    ("/v1/chat/completions", chat(temperature=5), OK, 400, None),
    ("/v1/chat/completions", chat(max_tokens=1000), OK, 400, "context_length_exceeded"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "word " * 600}]), OK, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", chat(max_tokens=0), OK, 400, None),
    ("/v1/chat/completions", chat(n=2), OK, 400, None),
    ("/v1/chat/completions", chat(tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]),
     OK, 400, None),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), OK, 400, None),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=50), OK, 400, None),
    ("/v1/chat/completions", chat(stream="yes"), OK, 400, None),
    ("/v1/chat/completions", chat(presence_penalty=1.0), OK, 400, None),
    ("/v1/chat/completions", chat(reasoning_effort="turbo"), OK, 400, None),
    ("/v1/chat/completions", chat(stop=[1, 2]), OK, 400, None),
    ("/v1/chat/completions", chat(), {}, 401, "missing_api_key"),
    ("/v1/chat/completions", chat(), {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ("/v1/completions", {"model": "demo", "prompt": [10 ** 9]}, OK, 400, None),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "echo": True}, OK, 400, None),
    ("/v1/messages", b"{oops", OK, 400, "invalid_request_error"),
    ("/v1/messages", {"model": "demo", "messages": MSG}, OK, 400, "invalid_request_error"),
    ("/v1/messages", anth(model="claude-x"), OK, 404, "not_found_error"),
    ("/v1/messages", anth(temperature=1.5), OK, 400, "invalid_request_error"),
    ("/v1/messages", anth(max_tokens="many"), OK, 400, "invalid_request_error"),
    ("/v1/messages", anth(messages=[{"role": "user", "content": [{"type": "image"}]}]), OK, 400,
     "invalid_request_error"),
    ("/v1/messages", anth(), {"x-api-key": "nope"}, 401, "authentication_error"),
    ("/v1/messages", anth(max_tokens=5000), OK, 400, "invalid_request_error"),
    ("/v1/messages/count_tokens", {"model": "demo", "messages": "hi"}, OK, 400, "invalid_request_error"),
    ("/v1/nothing", {}, OK, 404, None),
]


def test_bad_request_corpus(demo_server):
    assert len(CORPUS) >= 20
    with httpx.Client(base_url=demo_server, timeout=30) as client:
        for path, body, headers, status, kind in CORPUS:
            if isinstance(body, bytes):
                r = client.post(path, content=body, headers={**headers, "content-type": "application/json"})
            else:
                r = client.post(path, json=body, headers=headers)
            case = f"{path} {body!r:.80} -> {r.status_code} {r.text[:200]}"
            assert r.status_code == status, case
            err = r.json()
            if path.startswith("/v1/messages"):
                assert err["type"] == "error" and err["error"]["type"] == kind, case
                assert err["error"]["message"], case
            else:
                assert set(err["error"]) == {"message", "type", "param", "code"}, case
                assert err["error"]["message"] and (kind is None or err["error"]["code"] == kind), case
            assert client.get("/health").json()["status"] == "ok"
        assert client.get("/v1/chat/completions", headers=OK).status_code == 405
        good = client.post("/v1/chat/completions", headers=OK,
                           json=chat(messages=[{"role": "user", "content": random_text()}], max_tokens=2))
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
        assert client.get("/health").json()["running"] == 0


def test_full_queue_answers_429(demo_model):
    pytest.importorskip("openai")
    model = ScriptedModel(demo_model.tokenizer, context=512, delay=0.05)
    app = build_app(model, model_name="slow", api_key=API_KEY, max_batch=1, max_queue=1)
    body = {"model": "slow", "messages": [{"role": "user", "content": random_text()}],
            "reasoning_effort": "none", "temperature": 0}
    with live(app) as url, httpx.Client(base_url=url, headers=OK, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 400, "stream": True}) as a:
            assert a.status_code == 200
            deadline = time.monotonic() + 20
            while client.get("/health").json()["running"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)                                             # A is running
            queued = {}
            b = threading.Thread(target=lambda: queued.update(
                r=client.post("/v1/chat/completions", json={**body, "max_tokens": 3})))
            b.start()
            deadline = time.monotonic() + 20
            while client.get("/health").json()["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            over = client.post("/v1/chat/completions", json={**body, "max_tokens": 3})
            over_anthropic = client.post("/v1/messages", json={"model": "slow", "max_tokens": 3,
                                                               "messages": body["messages"]})
        b.join(60)                                                           # A disconnected: B ran
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
        assert over_anthropic.status_code == 429
        assert over_anthropic.json()["error"]["type"] == "rate_limit_error"
        assert queued["r"].status_code == 200 and queued["r"].json()["usage"]["completion_tokens"] == 3

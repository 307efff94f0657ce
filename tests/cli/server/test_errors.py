"""A corpus of bad requests: each gets the right status in its API's own error format, and the server
keeps serving.  Plus the bounded queue (429) on a deliberately slow server.

The corpus holds the original cases, then those of issue 13: bodies too large or provably longer than
the context (item 1), malformed but parseable requests that used to crash into a 500 (item 4: text
that is not a string, ids that are lists, deep nesting, sampling values the sampler could not run,
a schema that is not an object, lone surrogates), and cross-origin-shaped requests (item 11: a
non-JSON content type, a foreign Host)."""

import json
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


def nested(depth: int) -> bytes:
    """A chat request whose tool schema nests `depth` objects (as raw JSON: `json.dumps` would recurse)."""
    schema = '{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + "}}" * depth
    return (b'{"model":"demo","max_tokens":4,"messages":[{"role":"user","content":"hi"}],'
            b'"tools":[{"type":"function","function":{"name":"f","parameters":' + schema.encode() + b"}}]}")


def with_tool_call(call_id="c1", result_id="c1") -> list:
    return [*MSG, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": result_id, "content": "done"}]


def with_tool_use(use_id="t1", result_id="t1") -> list:
    return [*MSG, {"role": "assistant", "content": [{"type": "tool_use", "id": use_id, "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": result_id, "content": "done"}]}]


def text_part(text) -> list:
    return [{"type": "text", "text": text}]


TEXT_PLAIN = {**OK, "content-type": "text/plain"}
FORM = {**OK, "content-type": "application/x-www-form-urlencoded"}
FOREIGN = {**OK, "host": "attacker.example"}
LONG = "word " * 20_000               # ~100 kB: provably more than 384 tokens, far below the body limit


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
    ("/v1/chat/completions", chat(n=17), OK, 400, None),
    ("/v1/chat/completions", chat(tool_choice={"type": "function", "function": {"name": "g"}},
                                  tools=[{"type": "function", "function": {"name": "f"}}]), OK, 400, None),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), OK, 400, None),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=50), OK, 400, None),
    ("/v1/chat/completions", chat(stream="yes"), OK, 400, None),
    ("/v1/chat/completions", chat(presence_penalty=2.5), OK, 400, None),
    ("/v1/chat/completions", chat(frequency_penalty=-3), OK, 400, None),
    ("/v1/chat/completions", chat(logit_bias={"x": 1}), OK, 400, None),
    ("/v1/chat/completions", chat(logit_bias={"5": 101}), OK, 400, None),
    ("/v1/chat/completions", chat(logit_bias={"10000000": 1}), OK, 400, None),
    ("/v1/messages", anth(logit_bias={"5": 1}), OK, 400, "invalid_request_error"),
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
    # item 1: size.  The demo server's body limit is 4 MB; the others are refused on the length bound
    ("/v1/chat/completions", b'{"model": "demo", "messages": "' + b"x" * 4_100_000 + b'"}', OK, 413,
     "request_too_large"),
    ("/v1/messages", b'{"model": "demo", "messages": "' + b"x" * 4_100_000 + b'"}', OK, 413, "request_too_large"),
    ("/v1/messages/count_tokens", {"model": "demo", "messages": [{"role": "user", "content": LONG}]}, OK, 400,
     "invalid_request_error"),
    ("/v1/completions", {"model": "demo", "prompt": LONG}, OK, 400, "context_length_exceeded"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": LONG}]), OK, 400,
     "context_length_exceeded"),
    # item 4: text that is not a string
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": text_part(5)}]), OK, 400, None),
    ("/v1/chat/completions", chat(messages=[{"role": "system", "content": text_part([1])}, *MSG]), OK, 400, None),
    ("/v1/chat/completions", chat(messages=[*MSG, {"role": "assistant", "content": text_part({"a": 1})}, *MSG]),
     OK, 400, None),
    ("/v1/chat/completions", chat(messages=[*with_tool_call()[:2], {"role": "tool", "tool_call_id": "c1",
                                                                     "content": text_part(True)}]), OK, 400, None),
    ("/v1/messages", anth(messages=[{"role": "user", "content": text_part(5)}]), OK, 400, "invalid_request_error"),
    ("/v1/messages", anth(messages=[*MSG, {"role": "assistant", "content": [{"type": "thinking", "thinking": 5}]},
                                    *MSG]), OK, 400, "invalid_request_error"),
    ("/v1/messages", anth(system=text_part(7)), OK, 400, "invalid_request_error"),
    ("/v1/messages", anth(messages=[*with_tool_use()[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": text_part(5)}]}]), OK, 400, "invalid_request_error"),
    # item 4: a list as a tool-call id
    ("/v1/chat/completions", chat(messages=with_tool_call(call_id=["c1"])), OK, 400, None),
    ("/v1/chat/completions", chat(messages=with_tool_call(result_id=["c1"])), OK, 400, None),
    ("/v1/messages", anth(messages=with_tool_use(use_id=["t1"])), OK, 400, "invalid_request_error"),
    ("/v1/messages", anth(messages=with_tool_use(result_id=["t1"])), OK, 400, "invalid_request_error"),
    # item 4: deep nesting (past Python's recursion limit, and past MAX_DEPTH but under it)
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, OK, 400, None),
    ("/v1/messages", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, OK, 400, "invalid_request_error"),
    ("/v1/chat/completions", nested(500), OK, 400, None),
    ("/v1/chat/completions", nested(40), OK, 400, None),
    ("/v1/messages", anth(messages=[*MSG, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": json.loads('{"a":' * 80 + "1" + "}" * 80)}]}, *MSG]),
     OK, 400, "invalid_request_error"),
    ("/v1/messages/count_tokens", {"model": "demo", "messages": MSG, "tools": [
        {"name": "f", "input_schema": json.loads('{"a":' * 80 + "1" + "}" * 80)}]}, OK, 400, "invalid_request_error"),
    # item 4: sampling values that passed validation and failed in the sampler
    ("/v1/chat/completions", chat(seed=-1), OK, 400, None),
    ("/v1/chat/completions", chat(seed=2 ** 64), OK, 400, None),
    ("/v1/chat/completions", chat(temperature=1e-320), OK, 400, None),
    ("/v1/chat/completions", chat(repetition_penalty=1e-310), OK, 400, None),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "temperature": 1e-320}, OK, 400, None),
    ("/v1/messages", anth(seed=-1), OK, 400, "invalid_request_error"),
    # item 4: a json_schema that is not an object; lone surrogates; numbers JSON does not have
    ("/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": "x"}), OK, 400, None),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "\ud800"}]), OK, 400, None),
    ("/v1/messages", anth(messages=[{"role": "user", "content": "a\udfffb"}]), OK, 400, "invalid_request_error"),
    ("/v1/completions", {"model": "demo", "prompt": "\ud83d"}, OK, 400, None),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [], "temperature": NaN}', OK, 400, None),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [], "temperature": 1e999}', OK, 400, None),
    # item 11: a content type a browser may send cross-origin without asking; a foreign Host
    ("/v1/chat/completions", json.dumps(chat()).encode(), TEXT_PLAIN, 415, "unsupported_media_type"),
    ("/v1/completions", b'{"model": "demo", "prompt": "hi"}', FORM, 415, "unsupported_media_type"),
    ("/v1/messages", json.dumps(anth()).encode(), TEXT_PLAIN, 415, "invalid_request_error"),
    ("/v1/chat/completions", chat(), FOREIGN, 403, "host_not_allowed"),
    ("/v1/messages", anth(), FOREIGN, 403, "permission_error"),
]


def test_bad_request_corpus(demo_server):
    assert len(CORPUS) >= 70
    with httpx.Client(base_url=demo_server, timeout=30) as client:
        for path, body, headers, status, kind in CORPUS:
            if isinstance(body, bytes):
                r = client.post(path, content=body, headers={"content-type": "application/json", **headers})
            else:                                 # ASCII-escaped JSON, so lone surrogates can be sent
                r = client.post(path, content=json.dumps(body).encode(),
                                headers={"content-type": "application/json", **headers})
            case = f"{path} {body!r:.80} -> {r.status_code} {r.text[:200]}"
            assert r.status_code == status, case
            err = r.json()
            if path.startswith("/v1/messages"):
                assert err["type"] == "error" and err["error"]["type"] == kind, case
                assert err["error"]["message"], case
            else:
                assert set(err["error"]) == {"message", "type", "param", "code"}, case
                assert err["error"]["message"] and (kind is None or err["error"]["code"] == kind), case
                assert err["error"]["type"] == "invalid_request_error" or status == 404, case
            assert "Error:" not in r.text and "Traceback" not in r.text, case      # no exception text
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

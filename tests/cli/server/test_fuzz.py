"""Hypothesis fuzzing of the HTTP handlers (issue 13): plausible requests (edge values included), with up
to two values anywhere in them replaced by arbitrary JSON, are answered without a 5xx, in the API's own
error format, and leave the server healthy.  Runs on the scripted stand-in (fast steps), with at most 2
new tokens per request."""

import copy
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .server_helpers import API_KEY

SETTINGS = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HEADERS = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}

leaf = (st.none() | st.booleans() | st.integers(-2 ** 66, 2 ** 66) | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8) | st.sampled_from(["\ud800", "a\udfffb"]))          # lone surrogates
any_json = st.recursive(leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                        max_size=3), max_leaves=8)
text = st.text(max_size=24) | st.sampled_from(["<｜User｜>", "<think>", "</think>", ""])
schema = st.just({"type": "object", "properties": {"x": {"type": "string"}}})
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]), "text": text})
content = text | st.lists(part | text, max_size=3)
sampling = {"temperature": st.floats(0, 2.5), "top_p": st.floats(0, 1), "top_k": st.integers(-2, 50),
            "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0, 150), "seed": st.integers(-2, 2 ** 65)}

call = st.fixed_dictionaries({"id": text, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text, "arguments": st.just('{"x": "1"}') | st.dictionaries(st.text(max_size=3), leaf, max_size=2)})})
openai_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "user", "assistant", "tool"]), "content": content},
    optional={"tool_calls": st.lists(call, max_size=2), "tool_call_id": text, "reasoning_content": text,
              "prefix": st.booleans()})
openai_chat = st.fixed_dictionaries(
    {"model": st.just("scripted"), "messages": st.lists(openai_message, min_size=1, max_size=3)},
    optional={**sampling, "stop": st.lists(text, max_size=3),
              "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
                  {"name": st.sampled_from(["f", "get_weather"]), "parameters": schema})}), max_size=2),
              "tool_choice": st.sampled_from(["auto", "none", "required"]),
              "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"]),
                                                        "json_schema": st.fixed_dictionaries({"schema": schema})}),
              "logprobs": st.booleans(), "top_logprobs": st.integers(0, 25), "stream": st.booleans(),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "n": st.integers(0, 2),
              "thinking": st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled"])}),
              "reasoning_effort": st.sampled_from(["none", "low", "high", "max"]),
              "chat_template_kwargs": st.fixed_dictionaries({"thinking": st.booleans()}),
              "presence_penalty": st.sampled_from([0, 0.5]), "logit_bias": st.just({})})
completions = st.fixed_dictionaries(
    {"model": st.just("scripted"),
     "prompt": text | st.lists(st.integers(-2, 130_000), min_size=1, max_size=4) | st.lists(text, max_size=2)},
    optional={**sampling, "logprobs": st.integers(0, 6), "echo": st.just(False), "stream": st.booleans(),
              "stop": text})
block = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "text", "thinking", "tool_use", "tool_result", "image"]), "text": text},
    optional={"thinking": text, "id": text, "name": text, "input": st.dictionaries(st.text(max_size=3), leaf),
              "tool_use_id": text, "content": text | st.lists(part, max_size=2)})
anthropic_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "assistant"]),
                                           "content": text | st.lists(block, max_size=3)})
anthropic = st.fixed_dictionaries(
    {"model": st.just("scripted"), "messages": st.lists(anthropic_message, min_size=1, max_size=3)},
    optional={**sampling, "system": text | st.lists(part, max_size=2), "stream": st.booleans(),
              "stop_sequences": st.lists(text, max_size=2),
              "tools": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["f", "g"]), "input_schema": schema}),
                                max_size=2),
              "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "none", "any"])}),
              "thinking": st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled"])})})


def _paths(node, path=()):
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, path + (key,))


@st.composite
def mutated(draw, requests):
    """A request from `requests` with 0-2 values (anywhere) replaced by arbitrary JSON, and max_tokens
    either 1-2 or one that must be refused (never absent: that means "to the end of the context")."""
    body = copy.deepcopy(draw(requests))         # st.just values are shared between examples
    body["max_tokens"] = draw(st.integers(1, 2) | st.integers(-3, 0) | st.integers(10 ** 6, 10 ** 20) | any_json)
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from([p for p in _paths(body) if p]))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = draw(any_json)
    if body.get("max_tokens") is None or (type(body["max_tokens"]) is int and 2 < body["max_tokens"] < 10 ** 6):
        body["max_tokens"] = 2
    return body


@pytest.fixture(scope="module")
def client(scripted):
    model, url = scripted
    model.script.clear()
    with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as c:
        yield c
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0


def _check(client, path: str, body: dict) -> None:
    r = client.post(path, content=json.dumps(body).encode())    # ASCII escapes carry lone surrogates
    case = f"{path} {body!r:.300} -> {r.status_code} {r.text[:300]}"
    assert r.status_code < 500, case
    if r.status_code >= 400:
        err = r.json()
        if path.startswith("/v1/messages"):
            assert err["type"] == "error" and err["error"]["type"] and err["error"]["message"], case
        else:
            assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"], case
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in r.text and "api_error" not in r.text, case
    else:
        r.json()


@SETTINGS
@given(body=mutated(openai_chat))
def test_fuzz_chat_completions(client, body):
    _check(client, "/v1/chat/completions", body)


@SETTINGS
@given(body=mutated(completions))
def test_fuzz_completions(client, body):
    _check(client, "/v1/completions", body)


@SETTINGS
@given(body=mutated(anthropic), count=st.booleans())
def test_fuzz_messages(client, body, count):
    _check(client, "/v1/messages/count_tokens" if count else "/v1/messages", body)

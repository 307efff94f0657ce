"""Issue 19 items 1 and 4: the default reasoning mode of each API, and the endpoints other servers have:
/tokenize and /detokenize (llama-server shapes), /v1/models/{id}, /metrics (Prometheus text), CORS for
`--allowed-origins` only, and one access-log line per request."""

import logging
import re

import httpx
import pytest

from ..cli_helpers import error_line
from .server_helpers import (API_KEY, ScriptedModel, anthropic_prompt, live, openai_prompt, random_text,
                             serve_configs)

from dsv4.cli.server import build_app
from dsv4.portable.encoding import from_openai

prometheus_parser = pytest.importorskip("prometheus_client.parser")

OK = {"Authorization": f"Bearer {API_KEY}"}
EOS_TEXT = "<｜end▁of▁sentence｜>"
ORIGIN = "http://app.example"
ACCESS = re.compile(r"^(GET|POST|OPTIONS) (\S+) (\d{3}) prompt=(\d+) cached=(\d+) completion=(\d+) "
                    r"ttft=(\S+) tok/s=(\S+) time=\d+\.\d+s$")


@pytest.fixture(scope="module")
def scripted_app(demo_model):
    """(ScriptedModel, factory of live servers on it with build_app keyword arguments)."""
    model = ScriptedModel(demo_model.tokenizer)
    return model, lambda **kw: live(build_app(model, model_name="s", api_key=API_KEY, **kw))


@pytest.fixture(scope="module")
def server(scripted_app):
    model, serve = scripted_app
    with serve(allowed_origins=(ORIGIN,)) as url, httpx.Client(base_url=url, headers=OK, timeout=30) as client:
        yield model, client


def _chat(client, model, completion: str, **extra):
    """A chat completion whose output is scripted to be `completion` (the prompt as the server renders
    it in chat mode, the default)."""
    req = {"model": "s", "messages": [{"role": "user", "content": random_text(4)}], **extra}
    model.script.clear()
    model.plan(openai_prompt(model.tokenizer, {**req, "reasoning_effort": "none"}), completion)
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- item 1: default modes


def test_openai_defaults_to_chat_and_follows_the_request(server):
    model, client = server
    text = "Plain answer " + random_text(2)
    out = _chat(client, model, text, max_tokens=8)
    message = out["choices"][0]["message"]
    assert message["content"] and text.startswith(message["content"]) and "reasoning_content" not in message
    req = {"model": "s", "messages": [{"role": "user", "content": random_text(4)}], "reasoning_effort": "high"}
    model.script.clear()
    model.plan(openai_prompt(model.tokenizer, req), "hmm</think>Yes.")
    message = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "hmm" and message["content"] == "Yes."


def test_default_mode_thinking_is_stated_and_applied(scripted_app):
    model, serve = scripted_app
    with serve(default_mode="max") as url, httpx.Client(base_url=url, headers=OK, timeout=30) as client:
        assert client.get("/v1/models").json()["data"][0]["default_mode"] == "max"
        req = {"model": "s", "messages": [{"role": "user", "content": random_text(4)}]}
        model.script.clear()
        model.plan(openai_prompt(model.tokenizer, {**req, "reasoning_effort": "max"}), "deep</think>Done.")
        message = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]
        assert message["reasoning_content"] == "deep" and message["content"] == "Done."
    with pytest.raises(ValueError, match="default_mode must be one of chat, thinking, max"):
        build_app(model, default_mode="deep")


def test_anthropic_without_thinking_field_does_not_think(server):
    model, client = server
    req = {"model": "s", "max_tokens": 20, "messages": [{"role": "user", "content": random_text(4)}]}
    model.script.clear()
    model.plan(anthropic_prompt(model.tokenizer, {**req, "thinking": {"type": "disabled"}}), "Just text.")
    out = client.post("/v1/messages", json=req).json()
    assert [b["type"] for b in out["content"]] == ["text"] and out["content"][0]["text"] == "Just text."
    req["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    model.script.clear()
    model.plan(anthropic_prompt(model.tokenizer, req), "ponder</think>Said.")
    out = client.post("/v1/messages", json=req).json()
    assert [b["type"] for b in out["content"]] == ["thinking", "text"]
    assert out["content"][0]["thinking"] == "ponder" and out["content"][1]["text"] == "Said."


# ---------------------------------------------------------------- /tokenize, /detokenize, /v1/models/{id}


def test_tokenize_and_detokenize_round_trip(server):
    model, client = server
    tok = model.tokenizer
    text = f"{random_text(3)} {EOS_TEXT} café"
    ids = client.post("/tokenize", json={"content": text}).json()["tokens"]
    assert ids == tok.encode(text) and tok.eos_id not in ids
    assert client.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"] == [tok.bos_id] + ids
    pieces = client.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == text
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"content": text}
    assert client.post("/detokenize", json={"tokens": [tok.eos_id]}).json() == {"content": EOS_TEXT}
    assert client.post("/tokenize", json={"content": ""}).json() == {"tokens": []}


@pytest.mark.parametrize("body, message", [
    ({"tokens": [1, 10**9]}, "'tokens[1]' is 1000000000, outside the vocabulary"),
    ({"tokens": [-1]}, "'tokens[0]' is -1, outside the vocabulary"),
    ({"tokens": [True]}, "'tokens[0]' must be an integer token id"),
    ({"tokens": "12"}, "'tokens' must be of type array"),
    ({}, "missing required parameter 'tokens'"),
])
def test_detokenize_refuses_what_is_not_a_token_id(server, body, message):
    r = server[1].post("/detokenize", json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["message"].startswith(message) and error["param"] == "tokens"


def test_tokenize_refuses_a_missing_content_and_needs_the_key(server):
    model, client = server
    r = client.post("/tokenize", json={"text": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "content"
    r = httpx.post(str(client.base_url) + "/tokenize", json={"content": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_model_by_id(server):
    client = server[1]
    listed = client.get("/v1/models").json()["data"]
    one = client.get("/v1/models/s").json()
    assert listed == [one] and one["id"] == "s" and one["object"] == "model" and one["default_mode"] == "chat"
    r = client.get("/v1/models/other/name")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- /metrics


def _scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_parser.text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_move_with_requests(server):
    model, client = server
    before = _scrape(client)
    out = _chat(client, model, "Counted " + random_text(3))
    client.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})    # 415 at intake
    after = _scrape(client)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("dsv4_requests_total", route="/v1/chat/completions", status="200") == 1
    assert moved("dsv4_requests_total", route="/v1/chat/completions", status="415") == 1
    assert moved("dsv4_requests_total", route="/metrics", status="200") == 1
    assert moved("dsv4_prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert moved("dsv4_completion_tokens_total") == out["usage"]["completion_tokens"] > 1
    assert moved("dsv4_time_to_first_token_seconds_count") == 1
    assert moved("dsv4_generation_tokens_per_second_count") == 1
    assert after[("dsv4_queue_depth", ())] == 0 and after[("dsv4_running_requests", ())] == 0


def test_unknown_paths_share_one_route_label(server):
    client = server[1]
    before = _scrape(client)
    assert client.get(f"/no/such/{random_text(1)}").status_code == 404
    after = _scrape(client)
    key = ("dsv4_requests_total", (("route", "other"), ("status", "404")))
    assert after[key] - before.get(key, 0) == 1
    assert not any("/no/such" in str(labels) for _, labels in after)


# ---------------------------------------------------------------- CORS


def _preflight(client, origin: str):
    return client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_preflight_is_granted_to_allowed_origins_only(server, scripted_app):
    model, client = server
    ok = _preflight(client, ORIGIN)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = _preflight(client, "http://evil.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    with scripted_app[1]() as url, httpx.Client(base_url=url, headers=OK, timeout=30) as plain:
        r = _preflight(plain, ORIGIN)
        assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in plain.get("/v1/models", headers={"Origin": ORIGIN}).headers


# ---------------------------------------------------------------- access log


def test_one_access_line_per_request(server, caplog):
    model, client = server
    with caplog.at_level(logging.INFO, logger="dsv4.serve"):
        client.get("/v1/models")
        out = _chat(client, model, "Logged " + random_text(3))
        client.post("/detokenize", json={"tokens": [-5]})
        # A line is written just after its response is sent; the connection's next request is read
        # only after that, so this one makes sure the last line is there.
        client.get("/health")
    lines = [m for r in caplog.records
             if r.name == "dsv4.serve" and (m := ACCESS.match(r.getMessage())) and m[2] != "/health"]
    assert [(m[1], m[2], m[3]) for m in lines] == [("GET", "/v1/models", "200"),
                                                   ("POST", "/v1/chat/completions", "200"),
                                                   ("POST", "/detokenize", "400")]
    chat = lines[1]
    usage = out["usage"]
    assert (int(chat[4]), int(chat[5]), int(chat[6])) == (usage["prompt_tokens"],
                                                          usage["prompt_tokens_details"]["cached_tokens"],
                                                          usage["completion_tokens"])
    assert chat[7].endswith("s") and float(chat[7][:-1]) > 0 and float(chat[8]) > 0
    assert lines[0][7] == lines[0][8] == "-"


# ---------------------------------------------------------------- dsv4 serve flags


def test_serve_flags_reach_the_app(dsv4_cli, demo_model, monkeypatch):
    for args, line in ((["--default-mode", "deep"], "error: --default-mode must be one of chat, thinking, max, "
                                                     "got 'deep'"),
                       (["--allowed-origins", " ,"], "error: --allowed-origins needs at least one origin "
                                                     "(or * for any)")):
        r = dsv4_cli("serve", *args)
        assert r.exit_code == 2 and error_line(r) == line
    run, configs = serve_configs(dsv4_cli, demo_model, monkeypatch)
    assert run("--default-mode", "thinking", "--allowed-origins", f"{ORIGIN}, http://b.example").exit_code == 0
    app, config = configs[-1].app, configs[-1]
    assert app.state.server.default_mode == "thinking" and config.access_log is False
    cors = [m.kwargs["allow_origins"] for m in app.user_middleware if "allow_origins" in m.kwargs]
    assert cors == [[ORIGIN, "http://b.example"]]
    assert run().exit_code == 0
    app = configs[-1].app
    assert app.state.server.default_mode == "chat" and not any("allow_origins" in m.kwargs for m in app.user_middleware)


def test_openai_thinking_rules():
    """The request decides when it says anything; the server default only when it says nothing."""
    msgs = [{"role": "user", "content": "hi"}]
    cases = [({}, True, "max", ("thinking", "max")),
             ({}, False, None, ("chat", None)),
             ({"reasoning_effort": "high"}, False, None, ("thinking", "high")),
             ({"reasoning_effort": "none"}, True, "max", ("chat", None)),
             ({"thinking": {"type": "enabled"}}, False, None, ("thinking", None)),
             ({"thinking": {"type": "disabled"}}, True, "max", ("chat", None)),
             ({"chat_template_kwargs": {"thinking": False}, "reasoning_effort": "max"}, True, None, ("chat", "max"))]
    for extra, default_thinking, default_effort, expected in cases:
        enc = from_openai({"messages": msgs, **extra}, default_thinking=default_thinking,
                          default_effort=default_effort)
        assert (enc.thinking_mode, enc.reasoning_effort) == expected, extra

"""A model that writes NaN or Infinity into a `string="false"` tool-call parameter: every response body
is strict JSON (a non-finite number is not JSON), the value arrives as its raw text, and the completion
is answered, never refused as the client's fault."""

import json

import httpx
import pytest
from .server_helpers import API_KEY, anthropic_prompt, openai_prompt

from dsv4.portable.encoding.tokens import DSML

OK = {"Authorization": f"Bearer {API_KEY}", "anthropic-version": "2023-06-01"}
TOOL = {"name": "measure", "description": "Measure something",
        "parameters": {"type": "object", "properties": {"x": {"type": "number"}, "ys": {"type": "array"}}}}
CALL = (f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"measure\">\n"
        f"<{DSML}parameter name=\"x\" string=\"false\">NaN</{DSML}parameter>\n"
        f"<{DSML}parameter name=\"ys\" string=\"false\">[1, -Infinity, 1e400]</{DSML}parameter>\n"
        f"</{DSML}invoke>\n</{DSML}tool_calls>")
ARGUMENTS = {"x": "NaN", "ys": "[1, -Infinity, 1e400]"}


def strict(text: str):
    """`text` parsed as strict JSON: NaN, Infinity and numbers beyond a double fail the test."""
    def refuse(value):
        pytest.fail(f"{value} in a response body is not JSON")
    return json.loads(text, parse_constant=refuse,
                      parse_float=lambda s: float(s) if abs(float(s)) < float("inf") else refuse(s))


def frames(response) -> list:
    return [strict(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_openai_tool_call_with_non_finite_numbers(scripted):
    model, url = scripted
    req = {"model": "scripted", "messages": [{"role": "user", "content": "Measure."}],
           "tools": [{"type": "function", "function": TOOL}]}
    model.script.clear()
    model.plan(openai_prompt(model.tokenizer, req), "Measuring.</think>" + CALL)
    r = httpx.post(f"{url}/v1/chat/completions", headers=OK, json=req, timeout=30)
    assert r.status_code == 200, r.text
    choice = strict(r.text)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert strict(choice["message"]["tool_calls"][0]["function"]["arguments"]) == ARGUMENTS
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=OK, json={**req, "stream": True},
                      timeout=30) as s:
        calls = [tc for f in frames(s) if f["choices"] for tc in f["choices"][0]["delta"].get("tool_calls") or []]
    assert [strict(tc["function"]["arguments"]) for tc in calls] == [ARGUMENTS]


def test_anthropic_tool_use_with_non_finite_numbers(scripted):
    model, url = scripted
    req = {"model": "scripted", "max_tokens": 200, "messages": [{"role": "user", "content": "Measure."}],
           "tools": [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}]}
    model.script.clear()
    model.plan(anthropic_prompt(model.tokenizer, req), "Measuring.</think>" + CALL)
    r = httpx.post(f"{url}/v1/messages", headers=OK, json=req, timeout=30)
    assert r.status_code == 200, r.text
    message = strict(r.text)
    assert message["stop_reason"] == "tool_use"
    assert [b["input"] for b in message["content"] if b["type"] == "tool_use"] == [ARGUMENTS]
    with httpx.stream("POST", f"{url}/v1/messages", headers=OK, json={**req, "stream": True}, timeout=30) as s:
        events = frames(s)
    partial = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
               and e["delta"]["type"] == "input_json_delta"]
    assert [strict(p) for p in partial] == [ARGUMENTS] and events[-1]["type"] == "message_stop"

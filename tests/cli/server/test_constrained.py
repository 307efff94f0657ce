"""Constrained decoding through the real clients: forced tool calls (OpenAI `required` / a named
function, Anthropic `any` / a named tool) and `response_format` JSON, on the random-weight tiny model
(whose output must still be valid under the constraint), streaming and not, batched, and cut off by
max_tokens.  Every schema bounds its values, so a random model's output ends well inside the budget
(the tiny tokenizer spells the DSML markup in many tokens)."""

import json
import threading

import httpx
import pytest

import dsv4
from dsv4.cli.server import build_app
from dsv4.portable.tiny import ensure_tiny

from .server_helpers import API_KEY, live, openai_prompt, random_text

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

BOOK = {"name": "book_room", "description": "Book a hotel room", "parameters": {
    "type": "object", "required": ["room", "nights"], "additionalProperties": False,
    "properties": {"room": {"type": "string", "enum": ["single", "double"]},
                   "nights": {"type": "integer", "minimum": 1, "maximum": 9},
                   "guest": {"type": "string", "maxLength": 6},
                   "breakfast": {"type": "boolean"}}}}
CANCEL = {"name": "cancel", "description": "Cancel a booking", "parameters": {
    "type": "object", "required": ["code"], "properties": {"code": {"type": "integer", "minimum": 0, "maximum": 99}}}}
SCHEMAS = {t["name"]: t["parameters"] for t in (BOOK, CANCEL)}
OPENAI_TOOLS = [{"type": "function", "function": t} for t in (BOOK, CANCEL)]
ANTHROPIC_TOOLS = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                   for t in (BOOK, CANCEL)]
ANSWER = {"type": "object", "required": ["ok", "score"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "score": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}


@pytest.fixture(scope="module")
def tiny_server():
    """The tiny random-weight model (a vocabulary padded past its tokenizer's) behind the full server."""
    model = dsv4.load(ensure_tiny("tiny"), context=768)
    with live(build_app(model, model_name="tiny", api_key=API_KEY, max_batch=4, prefill_chunk=128)) as url:
        yield url


def user(text: str = "") -> list:
    return [{"role": "user", "content": f"{text} {random_text()}"}]


def check_call(name: str, arguments: str, allowed=SCHEMAS) -> None:
    assert name in allowed
    jsonschema.validate(json.loads(arguments), allowed[name])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "cancel"}}])
def test_openai_forced_tool_call(tiny_server, openai_client, stream, choice):
    client = openai_client(tiny_server)
    req = dict(model="tiny", messages=user("Book a room."), tools=OPENAI_TOOLS, tool_choice=choice,
               parallel_tool_calls=False, max_tokens=200, temperature=1.0)
    allowed = SCHEMAS if choice == "required" else {"cancel": SCHEMAS["cancel"]}
    if stream:
        chunks = list(client.chat.completions.create(**req, stream=True))
        calls = [tc.function for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice0 = client.chat.completions.create(**req).choices[0]
        calls, finish = [tc.function for tc in choice0.message.tool_calls or []], choice0.finish_reason
    assert finish == "tool_calls" and len(calls) == 1
    check_call(calls[0].name, calls[0].arguments, allowed)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "book_room"}])
def test_anthropic_forced_tool_use(tiny_server, anthropic_client, stream, choice):
    client = anthropic_client(tiny_server)
    req = dict(model="tiny", max_tokens=200, messages=user("Book a room."), tools=ANTHROPIC_TOOLS,
               tool_choice={**choice, "disable_parallel_tool_use": True})
    if stream:
        with client.messages.stream(**req) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**req)
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(uses) == 1
    allowed = SCHEMAS if choice["type"] == "any" else {"book_room": SCHEMAS["book_room"]}
    check_call(uses[0].name, json.dumps(uses[0].input), allowed)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_content_validates(tiny_server, openai_client, stream):
    client = openai_client(tiny_server)
    req = dict(model="tiny", messages=user("Rate this."), response_format=JSON_SCHEMA, max_tokens=80)
    if stream:
        chunks = list(client.chat.completions.create(**req, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**req).choices[0]
        content, finish = choice.message.content, choice.finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(content), ANSWER)


def test_too_small_a_budget_ends_with_length(tiny_server, openai_client, anthropic_client):
    """A constrained reply cut off is "length", never a call or JSON claimed complete."""
    client = openai_client(tiny_server)
    forced = client.chat.completions.create(model="tiny", messages=user(), tools=OPENAI_TOOLS,
                                            tool_choice="required", max_tokens=6).choices[0]
    assert forced.finish_reason == "length" and not forced.message.tool_calls
    answer = client.chat.completions.create(model="tiny", messages=user(), response_format={"type": "json_object"},
                                            max_tokens=3).choices[0]
    assert answer.finish_reason == "length" and answer.message.content.startswith("{")
    message = anthropic_client(tiny_server).messages.create(model="tiny", max_tokens=6, messages=user(),
                                                            tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"})
    assert message.stop_reason == "max_tokens" and not [b for b in message.content if b.type == "tool_use"]


def test_concurrent_constrained_requests_batch(tiny_server, openai_client):
    client = openai_client(tiny_server)
    before = httpx.get(tiny_server + "/health").json()
    results = {}

    def call():
        results["call"] = client.chat.completions.create(
            model="tiny", messages=user("Cancel it."), tools=OPENAI_TOOLS, max_tokens=200,
            parallel_tool_calls=False, tool_choice={"type": "function", "function": {"name": "book_room"}}).choices[0]

    def answer():
        results["answer"] = client.chat.completions.create(
            model="tiny", messages=user("Rate it."), response_format=JSON_SCHEMA, max_tokens=80).choices[0]

    threads = [threading.Thread(target=f) for f in (call, answer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = httpx.get(tiny_server + "/health").json()
    for tool_call in results["call"].message.tool_calls:
        check_call(tool_call.function.name, tool_call.function.arguments, {"book_room": SCHEMAS["book_room"]})
    assert results["call"].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(results["answer"].message.content), ANSWER)
    assert after["decode_rows"] - before["decode_rows"] > after["decode_steps"] - before["decode_steps"]


def test_thinking_comes_before_the_forced_call(scripted, openai_client):
    """The reasoning is free (here scripted, up to `</think>`); then the call is forced."""
    model, url = scripted
    req = {"model": "scripted", "messages": user("Book."), "tools": OPENAI_TOOLS, "tool_choice": "required",
           "parallel_tool_calls": False, "reasoning_effort": "high", "max_tokens": 200}
    thought = f"I should book, {random_text(2)}."
    prompt = openai_prompt(model.tokenizer, req)
    ids = model.tokenizer.encode(thought) + [model.tokenizer.special_ids["think_close"]]
    model.script.clear()
    model.script.update({len(prompt) + i: t for i, t in enumerate(ids)})
    message = openai_client(url).chat.completions.create(**req).choices[0].message
    model.script.clear()
    assert message.reasoning_content == thought and not message.content
    [call] = message.tool_calls
    check_call(call.function.name, call.function.arguments)


def test_forced_choices_that_cannot_be_honoured_are_400(tiny_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"model": "tiny", "messages": user(), "max_tokens": 5}
    cases = [({**chat, "tools": OPENAI_TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
              "tool_choice"),
             ({**chat, "tool_choice": "required"}, "tool_choice"),
             ({**chat, "tool_choice": "required",
               "tools": [{"type": "function", "function": {"name": "f", "parameters": {"oneOf": []}}}]}, "tools"),
             ({**chat, "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/x"}}}},
              "response_format")]
    for body, param in cases:
        r = httpx.post(tiny_server + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(tiny_server + "/v1/messages", headers=headers, json={
        "model": "tiny", "max_tokens": 5, "messages": user(), "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "tool", "name": "fly"}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "fly" in r.json()["error"]["message"]


# ---------------------------------------------------------------- frameworks' structured output
def _answer_model():
    """ANSWER as the pydantic model a LangChain user would write (bounded, like every schema here)."""
    from typing import Annotated

    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        """An answer with a verdict and a score."""
        ok: bool
        score: Annotated[int, Field(ge=0, le=99)]
    return Answer


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_openai_structured_output(tiny_server, method):
    """`with_structured_output` is LangChain's default structured path: `json_schema` sends a strict
    response_format, `function_calling` forces a named tool; both must come back as a parsed model."""
    langchain_openai = pytest.importorskip("langchain_openai")
    Answer = _answer_model()
    llm = langchain_openai.ChatOpenAI(model="tiny", base_url=tiny_server + "/v1", api_key=API_KEY,
                                      temperature=0, max_tokens=200, max_retries=0)
    out = llm.with_structured_output(Answer, method=method).invoke(f"Rate this: {random_text()}")
    assert isinstance(out, Answer) and 0 <= out.score <= 99


def test_langchain_anthropic_structured_output(tiny_server):
    """langchain-anthropic forces the schema as a tool (`tool_choice: {"type": "tool"}`)."""
    langchain_anthropic = pytest.importorskip("langchain_anthropic")
    Answer = _answer_model()
    llm = langchain_anthropic.ChatAnthropic(model="tiny", base_url=tiny_server, api_key=API_KEY,
                                            temperature=0, max_tokens=200, max_retries=0)
    out = llm.with_structured_output(Answer).invoke(f"Rate this: {random_text()}")
    assert isinstance(out, Answer) and 0 <= out.score <= 99

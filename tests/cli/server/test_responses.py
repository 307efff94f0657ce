"""The OpenAI Responses API (`/v1/responses`) through the official `openai` client and the OpenAI Agents
SDK, on the scripted stand-in (exact reasoning / text / tool calls) and the demo model.

The scripted completions are planned right after the prompt of the equivalent Chat Completions
request, written out by hand here: a Responses request that renders differently from its chat twin
gets random tokens instead of the script, and the assertions fail."""

import asyncio
import json
import random

import httpx
import pytest

from .server_helpers import API_KEY, openai_prompt, random_text
from .test_scripted import WEATHER, dsml_call

from dsv4.cli.server.fields import Body
from dsv4.cli.server.responses_api import chat_body
from dsv4.portable.encoding import from_openai

TOOL = {"type": "function", **WEATHER}          # a Responses function tool is flat


def _ids(tok, text: str) -> list:
    return tok.hf.encode(text, add_special_tokens=False).ids


def test_reasoning_and_text(scripted, openai_client):
    model, url = scripted
    tok = model.tokenizer
    text, thought, answer = random_text(), f"Thinking {random_text(2)}.", f"Answer: {random_text(3)}."
    model.script.clear()
    model.plan(openai_prompt(tok, {"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": text}], "reasoning_effort": "high"}),
               thought + "</think>" + answer)
    r = openai_client(url).responses.create(model="scripted", instructions="Be brief.", input=text,
                                            reasoning={"effort": "high"}, metadata={"k": "v"})
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == thought and r.output[0].summary == []
    assert r.output_text == answer and r.output[1].status == "completed" and r.metadata == {"k": "v"}
    usage = r.usage
    assert usage.output_tokens == len(_ids(tok, thought + "</think>" + answer)) + 1      # + EOS
    assert usage.output_tokens_details.reasoning_tokens == len(_ids(tok, thought + "</think>"))
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert r.incomplete_details is None


def test_history_in_chat_mode(scripted, openai_client):
    """Developer, user and assistant messages render as their chat twins; effort "none" is chat mode."""
    model, url = scripted
    tok = model.tokenizer
    rule, first, reply, text, answer = (random_text() for _ in range(5))
    model.script.clear()
    model.plan(openai_prompt(tok, {"messages": [{"role": "developer", "content": rule},
                                                {"role": "user", "content": first},
                                                {"role": "assistant", "content": reply},
                                                {"role": "user", "content": text}], "reasoning_effort": "none"}),
               answer)
    items = [{"role": "developer", "content": rule}, {"role": "user", "content": first},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": reply}]},
             {"role": "user", "content": [{"type": "input_text", "text": text}]}]
    r = openai_client(url).responses.create(model="scripted", reasoning={"effort": "none"}, input=items)
    assert [item.type for item in r.output] == ["message"] and r.output_text == answer
    assert r.usage.output_tokens_details.reasoning_tokens == 0


def test_stream_event_order(scripted, openai_client):
    model, url = scripted
    tok = model.tokenizer
    text, thought, preface = random_text(), f"Use the tool {random_text(2)}.", f"Checking {random_text(1)}."
    city, days = random.choice(["Oslo", "Lima", "Pune"]), random.randint(1, 9)
    chat = {"messages": [{"role": "user", "content": text}], "tools": [{"type": "function", "function": WEATHER}],
            "reasoning_effort": "high"}
    model.script.clear()
    model.plan(openai_prompt(tok, chat), thought + "</think>" + preface + dsml_call("get_weather", city, days))
    with openai_client(url).responses.stream(model="scripted", input=text, tools=[TOOL],
                                             reasoning={"effort": "high"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if not (k.endswith(".delta") and kinds[i - 1] == k)]
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    assert collapsed == (["response.created", "response.in_progress"]
                         + item + ["response.reasoning_text.delta", "response.reasoning_text.done"] + done
                         + item + ["response.output_text.delta", "response.output_text.done"] + done
                         + ["response.output_item.added", "response.function_call_arguments.delta",
                            "response.function_call_arguments.done", "response.output_item.done",
                            "response.completed"])
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == preface
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    call = final.output[2]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    assert json.loads(call.arguments) == {"city": city, "days": days}
    assert final.output_text == preface and final.status == "completed"
    assert final.usage.output_tokens == len(_ids(tok, thought + "</think>" + preface
                                                 + dsml_call("get_weather", city, days))) + 1


def test_function_tool_round_trip(scripted, openai_client):
    model, url = scripted
    tok = model.tokenizer
    client = openai_client(url)
    text, thought = f"Weather? {random_text()}", f"Call it {random_text(2)}."
    city, days = random.choice(["Riga", "Kyiv", "Accra"]), random.randint(1, 9)
    chat = {"messages": [{"role": "user", "content": text}], "tools": [{"type": "function", "function": WEATHER}],
            "reasoning_effort": "high"}
    model.script.clear()
    model.plan(openai_prompt(tok, chat), thought + "</think>" + dsml_call("get_weather", city, days))
    first = client.responses.create(model="scripted", input=text, tools=[TOOL], reasoning={"effort": "high"})
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[1]

    answer = f"Sunny in {city}."
    chat["messages"] += [{"role": "assistant", "content": "", "reasoning_content": thought,
                          "tool_calls": [{"id": call.call_id, "type": "function",
                                          "function": {"name": "get_weather", "arguments": call.arguments}}]},
                         {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 20 C"}]
    model.script.clear()
    model.plan(openai_prompt(tok, chat), "Done.</think>" + answer)
    items = [{"role": "user", "content": text}] + [item.model_dump(exclude_none=True) for item in first.output] \
        + [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 20 C"}]
    second = client.responses.create(model="scripted", input=items, tools=[TOOL], reasoning={"effort": "high"})
    assert second.output_text == answer and second.status == "completed"
    assert second.usage.input_tokens == len(openai_prompt(tok, chat))


def test_max_output_tokens_is_incomplete(scripted, openai_client):
    model, url = scripted
    tok = model.tokenizer
    text = random_text()
    model.script.clear()
    model.plan(openai_prompt(tok, {"messages": [{"role": "user", "content": text}], "reasoning_effort": "none"}),
               random_text(12))
    req = {"model": "scripted", "input": text, "reasoning": {"effort": "none"}, "max_output_tokens": 3}
    client = openai_client(url)
    r = client.responses.create(**req)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    events = list(client.responses.create(**req, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == r.output_text


def test_demo_model_answers(demo_server, demo_model, openai_client):
    text = random_text()
    r = openai_client(demo_server).responses.create(model="demo", input=text, max_output_tokens=4, temperature=0,
                                                    reasoning={"effort": "none"})
    assert r.usage.input_tokens == len(openai_prompt(demo_model.tokenizer, {
        "messages": [{"role": "user", "content": text}], "reasoning_effort": "none"}))
    assert r.status in ("completed", "incomplete") and isinstance(r.output_text, str)
    streamed = openai_client(demo_server).responses.create(model="demo", input=text, max_output_tokens=4,
                                                           temperature=0, reasoning={"effort": "none"}, stream=True)
    deltas = [e.delta for e in streamed if e.type == "response.output_text.delta"]
    assert "".join(deltas) == r.output_text


@pytest.mark.parametrize("body, status, param", [
    ({"input": "hi"}, 400, "model"),
    ({"model": "scripted"}, 400, "input"),
    ({"model": "other", "input": "hi"}, 404, "model"),
    ({"model": "scripted", "input": []}, 400, "input"),
    ({"model": "scripted", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input"),
    ({"model": "scripted", "input": [{"type": "web_search_call"}]}, 400, "input"),
    ({"model": "scripted", "input": [{"type": "function_call_output", "call_id": 7, "output": "x"}]}, 400, "input"),
    ({"model": "scripted", "input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"model": "scripted", "input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": "scripted", "input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}},
     400, "tool_choice"),
    ({"model": "scripted", "input": "hi", "tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"model": "scripted", "input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"model": "scripted", "input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text"),
    ({"model": "scripted", "input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"model": "scripted", "input": "hi", "temperature": 3}, 400, "temperature"),
    ({"model": "scripted", "input": "hi", "reasoning": {"effort": "huge"}}, 400, "reasoning"),
])
def test_bad_requests_get_openai_errors(scripted, body, status, param):
    _, url = scripted
    r = httpx.post(url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


UNIT = {"type": "function", "name": "set_unit", "description": "Pick the unit",
        "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "kelvin"]}},
                       "required": ["unit"], "additionalProperties": False}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "set_unit"}])
def test_forced_tool_choice_calls_the_tool(scripted, openai_client, choice):
    """The script spells plain text; the constraint must turn the reply into a valid call anyway."""
    pytest.importorskip("llguidance")
    model, url = scripted
    text = random_text()
    model.script.clear()
    model.plan(openai_prompt(model.tokenizer, {"messages": [{"role": "user", "content": text}],
                                               "reasoning_effort": "none"}), "No tool for me.")
    # Off-script logits are random, and a free string argument (the weather tool's city) ends only at a
    # multi-token DSML closing tag they almost never spell: "required" is tried where every argument is
    # an enum, the named choice beside the weather tool it must not pick.
    tools = [UNIT] if choice == "required" else [TOOL, UNIT]
    r = openai_client(url).responses.create(model="scripted", input=text, tools=tools, tool_choice=choice,
                                            parallel_tool_calls=False, reasoning={"effort": "none"},
                                            max_output_tokens=200)
    calls = [item for item in r.output if item.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1 and r.output_text == "", (r.usage, r.output)
    if isinstance(choice, dict):
        assert calls[0].name == "set_unit"
    if calls[0].name == "set_unit":
        assert json.loads(calls[0].arguments) in ({"unit": "celsius"}, {"unit": "kelvin"})


def test_json_schema_format_is_valid_json(scripted, openai_client):
    pytest.importorskip("llguidance")
    model, url = scripted
    text = random_text()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    model.script.clear()
    r = openai_client(url).responses.create(
        model="scripted", input=text, reasoning={"effort": "none"}, max_output_tokens=100,
        text={"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}})
    assert r.status == "completed" and json.loads(r.output_text) in ({"ok": True}, {"ok": False})
    assert r.text.format.type == "json_schema"


def _responses_prompt(tok, request: dict) -> list:
    """The prompt the server builds for a Responses request body (for planning what it answers)."""
    return tok.encode_messages(**from_openai(chat_body(Body(json.dumps(request).encode()), "2604")).as_kwargs())


def test_agents_sdk_calls_a_function_tool(scripted):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    model, url = scripted
    tok = model.tokenizer
    city, answer = random.choice(["Nice", "Bern", "Cork"]), f"It is sunny, {random_text(2)}."
    calls = []

    @agents.function_tool
    def get_weather(city: str, days: int) -> str:
        """Weather forecast for a city."""
        calls.append((city, days))
        return f"sunny in {city}"

    async def plan_reply(request: httpx.Request) -> None:
        """Script the turn the agent asks for: a tool call first, the answer once the tool's output is in."""
        body = json.loads(request.content)
        model.script.clear()
        if any(item.get("type") == "function_call_output" for item in body["input"]):
            model.plan(_responses_prompt(tok, body), "Got it.</think>" + answer)
        else:
            model.plan(_responses_prompt(tok, body), "Need the tool.</think>" + dsml_call("get_weather", city, 3))

    async def run():
        http = httpx.AsyncClient(event_hooks={"request": [plan_reply]}, timeout=120)
        client = AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, http_client=http)
        agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather],
                             model=agents.OpenAIResponsesModel(model="scripted", openai_client=client),
                             model_settings=agents.ModelSettings(reasoning={"effort": "high"}))
        try:
            plain = await agents.Runner.run(agent, f"Weather in {city}?")
            streamed = agents.Runner.run_streamed(agent, f"Weather in {city}?")
            deltas = [ev.data.delta async for ev in streamed.stream_events()
                      if ev.type == "raw_response_event" and ev.data.type == "response.output_text.delta"]
            return plain, streamed, deltas
        finally:
            await http.aclose()

    agents.set_tracing_disabled(True)
    plain, streamed, deltas = asyncio.run(run())
    assert calls == [(city, 3), (city, 3)]
    assert plain.final_output == answer and streamed.final_output == answer and "".join(deltas) == answer
    for result in (plain, streamed):
        kinds = [item.type for item in result.new_items]
        assert kinds[-1] == "message_output_item" and "tool_call_item" in kinds and "tool_call_output_item" in kinds

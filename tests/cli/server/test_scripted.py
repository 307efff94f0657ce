"""Tool calls, reasoning and stop strings end to end, with scripted model output (see `ScriptedModel`).

The completions are written in V4's own output format and tokenized with the real tokenizer; the
server must detokenize, parse and serialize them for each client without leaking DSML."""

import json
import random

from .server_helpers import anthropic_prompt, openai_prompt, random_text

from dsv4.portable.encoding.tokens import DSML

WEATHER = {"name": "get_weather", "description": "Weather forecast for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "days": {"type": "integer"}}}}


def dsml_call(name: str, city: str, days: int) -> str:
    return (f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"{name}\">\n"
            f"<{DSML}parameter name=\"city\" string=\"true\">{city}</{DSML}parameter>\n"
            f"<{DSML}parameter name=\"days\" string=\"false\">{days}</{DSML}parameter>\n"
            f"</{DSML}invoke>\n</{DSML}tool_calls>")


def test_openai_tool_call_round_trip(scripted, openai_client):
    model, url = scripted
    tok = model.tokenizer
    client = openai_client(url)
    city, days = random.choice(["Paris", "Lagos", "Lima", "Oslo"]), random.randint(1, 9)
    thought, preface = f"The user wants weather, {random_text(2)}.", f"Checking {city}."
    req = {"model": "scripted", "messages": [{"role": "user", "content": f"Weather in {city}? {random_text()}"}],
           "tools": [{"type": "function", "function": WEATHER}], "reasoning_effort": "high"}
    model.script.clear()
    model.plan(openai_prompt(tok, req), thought + "</think>" + preface + dsml_call("get_weather", city, days))

    chunks = list(client.chat.completions.create(**req, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert reasoning == thought and content == preface
    assert all(DSML not in (d.content or "") and "<｜" not in (d.content or "") for d in deltas)
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id
    assert json.loads(calls[0].function.arguments) == {"city": city, "days": days}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    answer = f"It is sunny in {city} for {days} days."
    req["messages"] += [
        {"role": "assistant", "content": content, "reasoning_content": reasoning,
         "tool_calls": [{"id": calls[0].id, "type": "function",
                         "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    model.script.clear()
    model.plan(openai_prompt(tok, req), "The tool says sunny.</think>" + answer)
    final = client.chat.completions.create(**req)
    message = final.choices[0].message
    assert message.content == answer and message.reasoning_content == "The tool says sunny."
    assert not message.tool_calls and final.choices[0].finish_reason == "stop"
    assert final.usage.completion_tokens == len(tok.hf.encode("The tool says sunny.</think>" + answer,
                                                              add_special_tokens=False).ids) + 1


def test_anthropic_tool_use_round_trip(scripted, anthropic_client):
    model, url = scripted
    tok = model.tokenizer
    client = anthropic_client(url)
    city, days = random.choice(["Quito", "Perth", "Riga"]), random.randint(1, 9)
    tool = {"name": "get_weather", "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}
    req = {"model": "scripted", "max_tokens": 200, "tools": [tool], "system": "Be brief.",
           "thinking": {"type": "enabled", "budget_tokens": 1024},
           "messages": [{"role": "user", "content": f"Forecast for {city}? {random_text()}"}]}
    model.script.clear()
    thought = f"Need the tool {random_text(2)}."
    model.plan(anthropic_prompt(tok, req), thought + "</think>" + dsml_call("get_weather", city, days))
    with client.messages.stream(**req) as stream:
        kinds = [ev.type for ev in stream]
        msg = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == thought and msg.stop_reason == "tool_use"
    use = msg.content[1]
    assert use.name == "get_weather" and use.input == {"city": city, "days": days}

    req["messages"] += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rain"}]}]
    model.script.clear()
    model.plan(anthropic_prompt(tok, req), f"Rain.</think>Expect rain in {city}.")
    final = client.messages.create(**req)
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == f"Expect rain in {city}." and final.stop_reason == "end_turn"
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == len(anthropic_prompt(tok, req))


def test_stop_strings_cut_the_text(scripted, openai_client, anthropic_client):
    model, url = scripted
    tok = model.tokenizer
    head, tail = f"{random_text(2)} ", f" {random_text(2)}"
    req = {"model": "scripted", "messages": [{"role": "user", "content": random_text(4)}],
           "reasoning_effort": "none", "stop": ["HALT"]}
    model.script.clear()
    model.plan(openai_prompt(tok, req), head + "HALT" + tail)
    r = openai_client(url).chat.completions.create(**req)
    assert r.choices[0].message.content == head and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(tok.hf.encode(head + "HALT" + tail, add_special_tokens=False).ids)

    areq = {"model": "scripted", "max_tokens": 50, "stop_sequences": ["HALT"], "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": random_text(4)}]}
    model.script.clear()
    model.plan(anthropic_prompt(tok, areq), head + "HALT" + tail)
    m = anthropic_client(url).messages.create(**areq)
    assert m.content[0].text == head and m.stop_reason == "stop_sequence" and m.stop_sequence == "HALT"


def test_count_tokens_matches_the_encoder(scripted, anthropic_client):
    model, url = scripted
    req = {"model": "scripted", "system": random_text(), "messages": [{"role": "user", "content": random_text(5)}]}
    count = anthropic_client(url).messages.count_tokens(**req)
    assert count.input_tokens == len(anthropic_prompt(model.tokenizer, req))

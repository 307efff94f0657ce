"""OpenAI and Anthropic request mapping (spec §4) into encoder input."""

import pytest

from dsv4.portable.encoding import (RequestError, encode_messages, from_anthropic, from_openai,
                                    map_reasoning_effort)
from dsv4.portable.encoding.tokens import ASSISTANT, BOS, DSML, EOS, THINK_CLOSE, THINK_OPEN, USER

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def prompt(inp):
    return encode_messages(**inp.as_kwargs())


def test_openai_basic_defaults_to_thinking():
    inp = from_openai({"messages": [{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}]})
    assert inp.thinking_mode == "thinking"
    assert prompt(inp) == f"{BOS}Be brief.{USER}a\n\nb{ASSISTANT}{THINK_OPEN}"


@pytest.mark.parametrize("extra, mode", [
    ({"thinking": {"type": "disabled"}}, "chat"), ({"thinking": {"type": "enabled"}}, "thinking"),
    ({"chat_template_kwargs": {"thinking": False}}, "chat"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat"),
    ({"reasoning_effort": "none"}, "chat"), ({}, "thinking"),
])
def test_openai_thinking_switches(extra, mode):
    assert from_openai({"messages": [{"role": "user", "content": "x"}], **extra}).thinking_mode == mode


@pytest.mark.parametrize("table, effort, mapped", [
    ("2604", "low", "high"), ("2604", "medium", "high"), ("2604", "xhigh", "max"), ("2604", "max", "max"),
    ("0731", "minimal", "low"), ("0731", "medium", "low"), ("0731", "xhigh", "high"), ("0731", "max", "max"),
    ("dsv4-0731", "high", "high"), ("2604", None, None),
])
def test_effort_mapping(table, effort, mapped):
    assert map_reasoning_effort(effort, table) == mapped
    inp = from_openai({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": effort},
                      effort_table=table)
    prompt(inp)  # the mapped value is valid for that table


def test_openai_tools_history_and_results():
    req = {"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "need tool", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "rain"}]},
    ], "tools": [WEATHER], "tool_choice": "auto"}
    text = prompt(from_openai(req))
    assert text.startswith(f"{BOS}S\n\n## Tools")
    assert f'{ASSISTANT}{THINK_OPEN}need tool{THINK_CLOSE}\n\n<{DSML}tool_calls>' in text
    assert text.endswith(f"{USER}<tool_result>rain</tool_result>{ASSISTANT}{THINK_OPEN}")


def test_openai_tool_choice():
    base = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}
    assert from_openai({**base, "tool_choice": "none"}).tools is None
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        inp = from_openai({**base, "tool_choice": choice})       # forced by a constraint, not the prompt
        assert inp.tools == [WEATHER] and inp.output.forced and "output" not in inp.as_kwargs()
    with pytest.raises(RequestError):
        from_openai({**base, "tool_choice": {"type": "function", "function": {"name": "nope"}}})


def test_openai_prefix_and_response_format():
    inp = from_openai({"messages": [{"role": "user", "content": "x"},
                                    {"role": "assistant", "content": "```", "prefix": True}],
                       "thinking": {"type": "disabled"},
                       "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}})
    text = prompt(inp)
    assert text.endswith(f"{ASSISTANT}{THINK_CLOSE}```")
    assert text.startswith(f'{BOS}\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{{"type": "object"}}{USER}')


@pytest.mark.parametrize("req", [
    {"messages": []},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "function", "content": "x"}]},
    {"messages": [{"role": "assistant", "content": "a", "prefix": True}, {"role": "user", "content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]},
    {"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "maybe"}},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "grammar"}},
])
def test_openai_rejections(req):
    with pytest.raises(RequestError):
        from_openai(req)


def test_anthropic_full_conversation():
    req = {
        "system": [{"type": "text", "text": "S"}],
        "tools": [{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "need tool", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "rain"}]},
                {"type": "text", "text": "In French."}]},
        ]}
    inp = from_anthropic(req)
    assert inp.thinking_mode == "thinking"
    text = prompt(inp)
    assert '{"name": "get_weather", "description": "w", "parameters": {"type": "object"}}' in text
    assert (f'need tool{THINK_CLOSE}Checking.\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
            f'<{DSML}parameter name="city" string="true">Oslo</{DSML}parameter>') in text
    assert text.endswith(f"{USER}<tool_result>rain</tool_result>\n\nIn French.{ASSISTANT}{THINK_OPEN}")


def test_anthropic_prefill_and_thinking_off():
    inp = from_anthropic({"thinking": {"type": "disabled"}, "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "{"}]})
    assert prompt(inp) == f"{BOS}{USER}x{ASSISTANT}{THINK_CLOSE}{{"
    inp = from_anthropic({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"},
                                       {"role": "user", "content": "y"}]}, default_thinking=False)
    assert prompt(inp).endswith(f"a{EOS}{USER}y{ASSISTANT}{THINK_CLOSE}")


@pytest.mark.parametrize("req", [
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "w"}]},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}},
    {"messages": [{"role": "system", "content": "x"}]},
    {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "1", "input": {}}]}]},
])
def test_anthropic_rejections(req):
    with pytest.raises(RequestError):
        from_anthropic(req)

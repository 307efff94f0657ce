"""Encoder rules beyond the shared vectors: pinned template texts, both effort tables, the inline
spec examples (E13–E16, E20–E22, E25–E27) and the documented quirk decisions."""

import hashlib

import pytest

from dsv4.portable.encoding import EncodingError, encode_messages
from dsv4.portable.encoding.templates import EFFORT_HIGH_0731_MAX_2604, EFFORT_MAX_0731, TOOLS_TEMPLATE
from dsv4.portable.encoding.tokens import (ASSISTANT, BOS, EOS, TASK_TOKENS, THINK_CLOSE, THINK_OPEN,
                                           USER)

SYS = {"role": "system", "content": "You are a helpful assistant."}
HI = {"role": "user", "content": "Hello"}
TOOL = {"type": "function", "function": {"name": "f", "description": "d",
                                         "parameters": {"type": "object", "properties": {}}}}


def sha(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def test_template_texts_match_spec_checksums():
    assert sha(TOOLS_TEMPLATE.replace("{schemas}", "")) == \
        "c7d3159308f7d076bee8974ece110fda1f92f6e577306e602ba2b466b4dcd904"
    assert len(EFFORT_HIGH_0731_MAX_2604) == 476
    assert sha(EFFORT_HIGH_0731_MAX_2604) == "f7a24f3b3050d4a83781e9b755b316aae2ec1d9dc87562541d90bcb04d7350f7"
    assert len(EFFORT_MAX_0731) == 526
    assert sha(EFFORT_MAX_0731) == "53fb31b8392ec5b4a926481943efc67636748f137c1a49d493a7af4d4fa55d2c"


@pytest.mark.parametrize("table, effort, text", [
    ("2604", None, ""), ("2604", "high", ""), ("2604", "max", EFFORT_HIGH_0731_MAX_2604),
    ("0731", None, ""), ("0731", "low", ""), ("0731", "high", EFFORT_HIGH_0731_MAX_2604),
    ("0731", "max", EFFORT_MAX_0731), ("dsv4-0731", "max", EFFORT_MAX_0731),
])
def test_effort_tables(table, effort, text):
    got = encode_messages([SYS, HI], "thinking", reasoning_effort=effort, effort_table=table)
    assert got == f"{BOS}{text}{SYS['content']}{USER}Hello{ASSISTANT}{THINK_OPEN}"
    # Chat mode and continuation calls never emit the effort text.
    assert not encode_messages([SYS, HI], "chat", reasoning_effort=effort, effort_table=table).count("Effort")
    assert "Effort" not in encode_messages([HI], "thinking", reasoning_effort=effort, effort_table=table,
                                           context=[SYS])


@pytest.mark.parametrize("table, effort", [("2604", "low"), ("0731", "medium"), ("2604", "xhigh"),
                                           ("1999", None)])
def test_invalid_effort_is_rejected(table, effort):
    with pytest.raises(EncodingError):
        encode_messages([HI], "thinking", reasoning_effort=effort, effort_table=table)


def test_e27_chat_history_in_thinking_mode_and_ids(official):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "u3"}]
    expected = (f"{BOS}S{USER}u1{ASSISTANT}{THINK_CLOSE}a1{EOS}{USER}u2{ASSISTANT}{THINK_CLOSE}a2{EOS}"
                f"{USER}u3{ASSISTANT}{THINK_OPEN}")
    assert encode_messages(msgs, "thinking") == expected
    assert official.encode_messages(msgs, thinking_mode="thinking") == [
        0, 53, 128803, 87, 19, 128804, 128822, 67, 19, 1, 128803, 87, 20, 128804, 128822, 67, 20, 1,
        128803, 87, 21, 128804, 128821]


def test_e16_keep_thinking_when_drop_disabled():
    msgs = [HI, {"role": "assistant", "content": "Hi", "reasoning_content": "greet"}, HI]
    assert encode_messages(msgs, "thinking", drop_thinking=False) == (
        f"{BOS}{USER}Hello{ASSISTANT}{THINK_OPEN}greet{THINK_CLOSE}Hi{EOS}{USER}Hello{ASSISTANT}{THINK_OPEN}")


def test_e13_request_tools_without_system_message_insert_one():
    prompt = encode_messages([HI], "chat", tools=[TOOL])
    assert prompt.startswith(f"{BOS}\n\n## Tools\n\n")
    assert prompt.endswith(f"calls.\n{USER}Hello{ASSISTANT}{THINK_CLOSE}")
    assert '{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}' in prompt


def test_request_tools_replace_message_tools():
    other = {"type": "function", "function": {"name": "old"}}
    prompt = encode_messages([{**SYS, "tools": [other]}, HI], "chat", tools=[TOOL])
    assert prompt.count("## Tools") == 1 and '"old"' not in prompt and '"f"' in prompt


def test_tools_keep_history_reasoning():
    msgs = [HI, {"role": "assistant", "content": "Hi", "reasoning_content": "greet"}, HI]
    prompt = encode_messages(msgs, "thinking", tools=[TOOL])
    assert f"{USER}Hello{ASSISTANT}{THINK_OPEN}greet{THINK_CLOSE}Hi{EOS}" in prompt


def test_e14_response_format_after_tools():
    msgs = [{**SYS, "tools": [TOOL], "response_format": {"type": "object"}}, HI]
    prompt = encode_messages(msgs, "chat")
    assert prompt.index("## Tools") < prompt.index("## Response Format")
    assert (f"calls.\n\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
            f'reply:\n{{"type": "object"}}{USER}') in prompt


def test_e25_tool_content_parts_and_e26_tool_joins_user_turn():
    msgs = [HI, {"role": "tool", "tool_call_id": "x",
                 "content": [{"type": "text", "text": "a"}, {"type": "image", "url": "u"},
                             {"type": "text", "text": "b"}]}]
    assert encode_messages(msgs, "chat") == (
        f"{BOS}{USER}Hello\n\n<tool_result>a\n\n[Unsupported image]\n\nb</tool_result>{ASSISTANT}{THINK_CLOSE}")


def test_e15b_thinking_prefix_closes_reasoning():
    msgs = [HI, {"role": "assistant", "content": "```python\n", "wo_eos": True}]
    assert encode_messages(msgs, "thinking") == (
        f"{BOS}{USER}Hello{ASSISTANT}{THINK_OPEN}{THINK_CLOSE}```python\n")


@pytest.mark.parametrize("task", ["query", "authority", "domain", "title", "read_url"])
def test_task_tokens_end_the_prompt(task):
    assert encode_messages([{"role": "user", "content": "x", "task": task}], "chat") == \
        f"{BOS}{USER}x{TASK_TOKENS[task]}"


def test_action_task_in_thinking_mode():
    assert encode_messages([{"role": "user", "content": "x", "task": "action"}], "thinking") == \
        f"{BOS}{USER}x{ASSISTANT}{THINK_OPEN}{TASK_TOKENS['action']}"


# ------------------------------------------------------------------ quirk decisions


def test_none_contents_render_empty():
    msgs = [{"role": "user", "content": None},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": None}}]},
            {"role": "tool", "tool_call_id": "1", "content": None}]
    prompt = encode_messages(msgs, "chat")
    assert f"{USER}<tool_result></tool_result>{ASSISTANT}" in prompt
    assert '<\uff5cDSML\uff5cinvoke name="f">\n\n</\uff5cDSML\uff5cinvoke>' in prompt


def test_merged_user_message_keeps_its_task():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "task": "query"}]
    assert encode_messages(msgs, "chat") == f"{BOS}{USER}a\n\nb{TASK_TOKENS['query']}"


def test_reminder_moves_before_the_user_turn_mid_conversation():
    msgs = [HI, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "q"},
            {"role": "tool", "content": "t"}, {"role": "latest_reminder", "content": "R"}]
    assert encode_messages(msgs, "chat").endswith(
        f"Hi{EOS}<\uff5clatest_reminder\uff5c>R{USER}q\n\n<tool_result>t</tool_result>{ASSISTANT}{THINK_CLOSE}")


def test_arguments_dict_and_string_render_identically():
    def conv(args):
        return [HI, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": args}}]}]
    args = {"city": "Zürich", "n": 2, "x": [1, {"a": None}], "ok": True, "f": 1.5}
    import json
    assert encode_messages(conv(args), "chat") == encode_messages(conv(json.dumps(args)), "chat") == \
        encode_messages(conv(json.dumps(args, separators=(",", ":"))), "chat")


@pytest.mark.parametrize("args", ["42", "null", "[1]", '"x"', 7])
def test_non_object_arguments_are_rejected(args):
    msgs = [HI, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": args}}]}]
    with pytest.raises(EncodingError):
        encode_messages(msgs, "chat")


@pytest.mark.parametrize("messages", [
    [{"role": "function", "content": "x"}],
    [{"role": "developer", "content": ""}],
    [{"role": "user", "content": "x", "task": "nope"}],
    [{"role": "user", "content": 5}],
    ["not a dict"],
    [{"role": "system", "content": "", "tools": [{"name": "bare"}]}, HI],
])
def test_bad_input_raises_encoding_error(messages):
    with pytest.raises(EncodingError):
        encode_messages(messages, "chat")


def test_bad_thinking_mode():
    with pytest.raises(EncodingError):
        encode_messages([HI], "auto")


def test_input_is_not_mutated():
    import copy
    msgs = [{**SYS, "tools": [TOOL]}, HI, {"role": "tool", "tool_call_id": "1", "content": "r"}]
    before = copy.deepcopy(msgs)
    encode_messages(msgs, "thinking", tools=[TOOL])
    assert msgs == before

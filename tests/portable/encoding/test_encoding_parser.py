"""Strict parser edge cases (spec §5.2) and the tolerant streaming parser (spec §5.3)."""

import json

import pytest

from dsv4.portable.encoding import (ContentDelta, ParseError, ReasoningDelta, StreamParser, ToolCallEvent,
                                    parse_completion)
from dsv4.portable.encoding.tokens import DSML, EOS

BLOCK = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n'
         f'<{DSML}parameter name="a" string="true">x</{DSML}parameter>\n'
         f'<{DSML}parameter name="b" string="false">{{"k":1}}</{DSML}parameter>\n'
         f'</{DSML}invoke>\n</{DSML}tool_calls>')
ARGS = '{"a": "x", "b": {"k":1}}'


def stream(text, mode="thinking", pieces=1):
    parser = StreamParser(mode)
    events = []
    for k in range(0, len(text), pieces):
        events += parser.feed(text[k:k + pieces])
    events += parser.finish()
    return parser, events


# ------------------------------------------------------------------ strict


def test_eos_after_tool_block_is_optional():
    assert parse_completion("r</think>c" + BLOCK, "thinking")["tool_calls"][0]["function"]["arguments"] == ARGS
    assert parse_completion("r</think>c" + BLOCK + EOS, "thinking")["content"] == "c"


def test_empty_invoke_body_as_the_encoder_writes_it():
    text = f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="refresh">\n\n</{DSML}invoke>\n</{DSML}tool_calls>{EOS}'
    assert parse_completion(text, "chat")["tool_calls"] == [
        {"type": "function", "function": {"name": "refresh", "arguments": "{}"}}]


@pytest.mark.parametrize("text, mode, error", [
    ("r" + BLOCK + EOS, "thinking", "missing </think>"),
    ("r</think>c" + BLOCK + "trailing", "thinking", "after the tool calls"),
    ("r</think>c" + BLOCK + EOS + "x", "thinking", "after the tool calls"),
    ("c" + BLOCK.replace('name="b"', 'name="a"') + EOS, "chat", "duplicate"),
    ("c" + BLOCK[:-12], "chat", "tool_calls"),
    ("a<think>b" + EOS, "chat", "content contains"),
    (f"r{DSML}</think>c{EOS}", "thinking", "reasoning_content contains"),
    ("c" + EOS, "auto", "thinking_mode"),
])
def test_strict_errors(text, mode, error):
    with pytest.raises(ParseError, match=error):
        parse_completion(text, mode)


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("pieces", [1, 2, 3, 7, 1000])
def test_stream_events_for_a_tool_call(pieces):
    parser, events = stream("think</think>Let me check." + BLOCK + EOS, pieces=pieces)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "think"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Let me check."
    assert [e for e in events if isinstance(e, ToolCallEvent)] == [ToolCallEvent(0, "f", ARGS)]
    assert not parser.malformed


def test_stream_emits_tool_call_when_invoke_closes():
    parser = StreamParser("chat")
    head, tail = BLOCK.split(f"</{DSML}invoke>")
    assert not [e for e in parser.feed(head) if isinstance(e, ToolCallEvent)]
    assert [e for e in parser.feed(f"</{DSML}invoke>") if isinstance(e, ToolCallEvent)]


def test_stream_holds_back_only_possible_markers():
    parser = StreamParser("chat")
    assert parser.feed("Hello\n\n<") == [ContentDelta("Hello")]
    assert parser.feed("b>") == [ContentDelta("\n\n<b>")]
    parser = StreamParser("thinking")
    assert parser.feed("abc</thi") == [ReasoningDelta("abc")]
    assert parser.feed("nk>x") == [ContentDelta("x")]
    assert parser.feed("y<") == [ContentDelta("y")]
    assert parser.finish() == [ContentDelta("<")]


def test_tool_block_without_think_close_ends_reasoning():
    parser, events = stream("I will call." + BLOCK + EOS)
    msg = parser.message()
    assert msg["reasoning_content"] == "I will call." and msg["content"] == ""
    assert msg["tool_calls"][0]["function"]["name"] == "f"
    assert parser.malformed


def test_truncated_tool_block_is_cut_not_leaked():
    two = BLOCK.replace(f"</{DSML}invoke>\n</", f'</{DSML}invoke>\n<{DSML}invoke name="g">\n<{DSML}parameter name="q" string="true">par')
    parser, events = stream("r</think>Sure." + two[:-5], pieces=5)
    msg = parser.message()
    assert msg["content"] == "Sure." and DSML not in msg["content"]
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["f"]
    assert parser.malformed


def test_stray_dsml_in_content_never_leaks():
    parser, _ = stream(f"ok <{DSML}invoke name=\"x\">junk", mode="chat", pieces=3)
    assert parser.message()["content"] == "ok " and parser.malformed


def test_missing_eos_is_normal_and_unclosed_reasoning_is_kept():
    parser, _ = stream("plain answer", mode="chat")
    assert parser.message()["content"] == "plain answer" and not parser.malformed
    parser, _ = stream("still thinking")
    assert parser.message()["reasoning_content"] == "still thinking" and parser.malformed


def test_non_json_false_value_becomes_a_string_and_duplicates_keep_first():
    text = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n'
            f'<{DSML}parameter name="a" string="false">not json</{DSML}parameter>\n'
            f'<{DSML}parameter name="a" string="true">second</{DSML}parameter>\n'
            f'</{DSML}invoke>\n</{DSML}tool_calls>')
    parser, _ = stream(text, mode="chat")
    assert parser.message()["tool_calls"][0]["function"]["arguments"] == '{"a": "not json"}'
    assert len(parser.warnings) == 2


def test_text_after_eos_and_after_block():
    parser, _ = stream("a" + EOS + "zzz", mode="chat")
    assert parser.message()["content"] == "a" and parser.malformed
    assert parser.feed("more") == [] and parser.finish() == []
    parser, _ = stream("a" + BLOCK + " tail" + BLOCK, mode="chat")
    msg = parser.message()
    assert msg["content"] == "a tail" and len(msg["tool_calls"]) == 2 and parser.malformed


@pytest.mark.parametrize("text", ["", EOS, "</think>", BLOCK, f"<{DSML}", "\n\n<", "<", f"{DSML}{DSML}",
                                  f"</{DSML}tool_calls>", f"<{DSML}invoke name=\"a\"></{DSML}invoke>"])
@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_odd_inputs_never_raise(text, mode):
    for pieces in (1, 2, 100):
        parser, _ = stream(text, mode, pieces)
        assert DSML not in parser.message()["content"]


# ------------------------------------------------------------------ both: values, markup, non-finite numbers


def one_call(value, string="false"):
    return (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n'
            f'<{DSML}parameter name="a" string="{string}">{value}</{DSML}parameter>\n'
            f'<{DSML}parameter name="b" string="true">after</{DSML}parameter>\n'
            f'</{DSML}invoke>\n</{DSML}tool_calls>{EOS}')


@pytest.mark.parametrize("value, string, expected", [
    (f'{{"a": "{DSML}parameter"}}', "false", {"a": f"{DSML}parameter"}),
    (f'"<{DSML}parameter name=\\"x\\" string=\\"true\\">"', "false", f'<{DSML}parameter name="x" string="true">'),
    (f"</{DSML}invoke>\n<{DSML}invoke name=\"g\">", "true", f"</{DSML}invoke>\n<{DSML}invoke name=\"g\">"),
    (f"</{DSML}tool_calls>{EOS}tail", "true", f"</{DSML}tool_calls>{EOS}tail"),
    (f'["</{DSML}invoke>", {{"<{DSML}tool_calls>": 1}}]', "false", [f"</{DSML}invoke>", {f"<{DSML}tool_calls>": 1}]),
])
@pytest.mark.parametrize("pieces", [1, 2, 5, 1000])
def test_markup_inside_a_value_is_read_as_the_strict_parser_reads_it(value, string, expected, pieces):
    text = one_call(value, string)
    strict = parse_completion(text, "chat")
    assert json.loads(strict["tool_calls"][0]["function"]["arguments"]) == {"a": expected, "b": "after"}
    parser, events = stream(text, "chat", pieces)
    assert parser.message() == strict and not parser.malformed
    assert [e for e in events if isinstance(e, ToolCallEvent)] == [
        ToolCallEvent(0, "f", strict["tool_calls"][0]["function"]["arguments"])]


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400", "-2E+999", "[1, NaN]",
                                 '{"x": {"y": -Infinity}}', "not json", "[" * 5000 + "]" * 5000])
def test_a_value_that_is_not_strict_json_is_kept_as_its_raw_text(raw):
    """NaN/Infinity are not JSON (Python's json would write and read them): the arguments stay strict
    JSON, with the raw text as a string, in both parsers; the call is never lost."""
    text = one_call(raw)
    strict = parse_completion(text, "chat")
    parser, _ = stream(text, "chat", pieces=3)
    assert parser.message() == strict
    arguments = strict["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments, parse_constant=pytest.fail) == {"a": raw, "b": "after"}
    assert parser.warnings == ['parameter \'a\' is marked string="false" but is not strict JSON; passed as a string']


def test_strict_json_values_are_copied_verbatim():
    text = one_call('{"k":1,  "big": 123456789012345678901234567890, "f": 1.5e300}')
    arguments = parse_completion(text, "chat")["tool_calls"][0]["function"]["arguments"]
    assert arguments == '{"a": {"k":1,  "big": 123456789012345678901234567890, "f": 1.5e300}, "b": "after"}'

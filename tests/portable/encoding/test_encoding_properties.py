"""Hypothesis properties: the encoder never crashes on well-typed input, any split of a completion
streams to the strict parse (DSML markup inside parameter values included), arguments are strict JSON,
and parse(render(assistant message)) round-trips."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.portable.encoding import ParseError, StreamParser, encode_messages, parse_completion, render_prompt
from dsv4.portable.encoding.tokens import DSML, EOS

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_text = st.text(max_size=40)
# Text the V4 format can carry unambiguously: no markup characters (DSML has no escaping, spec §7.7).
safe_text = st.text(st.characters(blacklist_characters='<>"\uff5c', blacklist_categories=("Cs",)), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | safe_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(safe_text, children, max_size=3),
    max_leaves=8)


@st.composite
def messages(draw):
    out = []
    for role in draw(st.lists(st.sampled_from(["system", "user", "assistant", "tool", "developer",
                                               "latest_reminder"]), min_size=1, max_size=8)):
        m = {"role": role, "content": draw(any_text | st.none())}
        if role == "developer":
            m["content"] = "d" + (m["content"] or "")
        if role == "assistant":
            m["reasoning_content"] = draw(any_text | st.none())
            if draw(st.booleans()):
                m["tool_calls"] = [{"id": draw(any_text), "type": "function", "function": {
                    "name": draw(any_text), "arguments": draw(st.dictionaries(any_text, json_values, max_size=3))}}]
        if role == "tool":
            m["tool_call_id"] = draw(any_text)
        if role == "system" and draw(st.booleans()):
            m["tools"] = [{"type": "function", "function": {"name": draw(any_text)}}]
        out.append(m)
    return out


@SETTINGS
@given(messages(), st.sampled_from(["thinking", "chat"]), st.booleans(), st.integers(0, 3))
def test_encoder_never_crashes_and_tokenizes_losslessly(tiny, msgs, mode, drop, split):
    context, new = msgs[:split], msgs[split:]
    prompt = render_prompt(new, mode, drop_thinking=drop, context=context)
    assert tiny.decode(tiny.encode_prompt(prompt)) == str(prompt)


@st.composite
def assistant_turns(draw):
    calls = [{"type": "function", "function": {"name": draw(safe_text.filter(lambda s: s.strip() == s and s)),
                                               "arguments": draw(st.dictionaries(safe_text, json_values, max_size=3))}}
             for _ in range(draw(st.integers(0, 3)))]
    content = draw(safe_text)
    return {"role": "assistant", "reasoning_content": draw(safe_text), "content": content, "tool_calls": calls}


def _completion(turn, mode):
    """The text a model would generate for `turn`: the rendered turn minus the generation prompt."""
    user = {"role": "user", "content": "q"}
    before = encode_messages([user], mode)
    after = encode_messages([user, turn], mode)
    assert after.startswith(before)
    return after[len(before):]


@SETTINGS
@given(assistant_turns(), st.sampled_from(["thinking", "chat"]))
def test_parse_render_round_trip(turn, mode):
    parsed = parse_completion(_completion(turn, mode), mode)
    assert parsed["content"] == turn["content"]
    assert parsed["reasoning_content"] == (turn["reasoning_content"] if mode == "thinking" else "")
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == [c["function"]["name"] for c in turn["tool_calls"]]
    for got, sent in zip(parsed["tool_calls"], turn["tool_calls"]):
        assert got["function"]["arguments"] == json.dumps(sent["function"]["arguments"], ensure_ascii=False)


def _stream(text, mode, cuts):
    parser = StreamParser(mode)
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    for a, b in zip(points, points[1:]):
        parser.feed(text[a:b])
    parser.finish()
    return parser


@SETTINGS
@given(assistant_turns(), st.sampled_from(["thinking", "chat"]), st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_streams_to_the_strict_parse(turn, mode, cuts):
    text = _completion(turn, mode)
    parser = _stream(text, mode, cuts)
    assert parser.message() == parse_completion(text, mode)
    assert not parser.malformed


# Markup a parameter value may carry: a value ends only at `/｜DSML｜parameter`, so every other piece of
# DSML inside it is plain text to the strict parser.  The closing tag itself is in the list too: it cuts
# the value short, which either still parses (the stream must agree) or is refused.
MARKUP = [f"<{DSML}parameter", f'<{DSML}parameter name="k" string="false">', f"{DSML}parameter", DSML,
          f'<{DSML}invoke name="g">', f"</{DSML}invoke>", f"</{DSML}invoke", f"<{DSML}tool_calls>",
          f"</{DSML}tool_calls>", ">\n", "\n\n", "<", "</", "</think>", "<think>", EOS, f"</{DSML}parameter>"]
marked_text = st.lists(st.sampled_from(MARKUP) | safe_text, max_size=4).map("".join)
marked_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | marked_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(marked_text, children, max_size=3),
    max_leaves=6)


@st.composite
def marked_turns(draw):
    calls = [{"type": "function", "function": {"name": draw(safe_text | marked_text),
                                               "arguments": draw(st.dictionaries(safe_text | marked_text,
                                                                                 marked_values, max_size=3))}}
             for _ in range(draw(st.integers(0, 3)))]
    return {"role": "assistant", "reasoning_content": draw(safe_text), "content": draw(safe_text),
            "tool_calls": calls}


def _refuse(name):
    raise ValueError(f"{name} is not JSON")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(marked_turns(), st.sampled_from(["thinking", "chat"]), st.lists(st.integers(0, 10**6), max_size=16))
def test_markup_inside_values_streams_to_the_strict_parse(turn, mode, cuts):
    text = _completion(turn, mode)
    parser = _stream(text, mode, cuts)
    try:
        expected = parse_completion(text, mode)
    except ParseError:
        assert DSML not in parser.message()["content"]
        return
    assert parser.message() == expected
    for call in expected["tool_calls"]:       # strict JSON even where a value was NaN or Infinity
        args = json.loads(call["function"]["arguments"], parse_constant=_refuse)
        json.dumps(args, allow_nan=False)


FRAGMENTS = ["</think>", "<think>", "\n\n", "<", "</", "\uff5cDSML\uff5c", "tool_calls>", "invoke name=\"f\">",
             'parameter name="k" string="false">', "parameter>", "\n", "<\uff5cend\u2581of\u2581sentence\uff5c>"]
garbage = st.lists(st.sampled_from(FRAGMENTS + MARKUP) | st.text(max_size=5), max_size=25).map("".join)


@SETTINGS
@given(garbage, st.lists(st.integers(0, 100), max_size=8), st.sampled_from(["thinking", "chat"]))
def test_stream_parser_never_raises_on_garbage(text, cuts, mode):
    assert DSML not in _stream(text, mode, cuts).message()["content"]

"""The Constraint alone: grammars for forced DSML tool calls and JSON replies (`portable.constraints`).

Known-valid completions (rendered by the encoder itself) must pass token by token, known-invalid tokens
must be masked, and a random walk over the masks (what a random-weight model does under the constraint)
must end in output that the strict parser reads and whose arguments validate against the schema."""

import json

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from dsv4.portable.constraints import build_constraint  # noqa: E402
from dsv4.portable.encoding import from_anthropic, from_openai, load_tokenizer, parse_completion  # noqa: E402
from dsv4.portable.encoding.dsml import render_tool_calls  # noqa: E402
from dsv4.portable.encoding.errors import RequestError  # noqa: E402
from dsv4.portable.encoding.pieces import Prompt  # noqa: E402
from dsv4.portable.encoding.requests import OutputRule  # noqa: E402
from dsv4.portable.tiny import ensure_tiny  # noqa: E402

WEATHER = {"name": "get_weather", "description": "Forecast", "parameters": {
    "type": "object", "required": ["city", "days"], "additionalProperties": False,
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "where": {"$ref": "#/$defs/Point"}},
    "$defs": {"Point": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"],
                        "additionalProperties": False}}}}
PING = {"name": "ping", "parameters": {"type": "object", "properties": {}}}
# Every value bounded, so that a random walk ends in a few dozen tokens.
BOUNDED = {"name": "book", "parameters": {
    "type": "object", "required": ["room", "nights"], "additionalProperties": False,
    "properties": {"room": {"type": "string", "enum": ["single", "double"]},
                   "nights": {"type": "integer", "minimum": 1, "maximum": 9},
                   "name": {"type": "string", "maxLength": 6},
                   "extras": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}}}}
ANSWER = {"type": "object", "required": ["ok", "score"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "score": {"type": "integer", "minimum": 0, "maximum": 99},
                         "label": {"type": "string", "maxLength": 5}}}
VOCAB = 129_280


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(ensure_tiny("tiny"))


def rendered_call(tok, name, arguments, times: int = 1) -> list:
    """Ids of the DSML block the encoder writes for `times` calls of `name`."""
    prompt = Prompt()
    render_tool_calls(prompt, [{"function": {"name": name, "arguments": arguments}}] * times)
    return tok.encode_prompt(prompt)


def feed(constraint, ids) -> None:
    for k, token in enumerate(ids):
        assert constraint.mask()[token], f"token {k} ({token}) of a valid completion was masked"
        constraint.accept(token)


def finish(constraint, tok) -> None:
    """At the end of a valid completion the grammar is done: only EOS is still allowed."""
    mask = constraint.mask()
    assert constraint.finished and mask[tok.eos_id] and mask.sum() == 1
    constraint.accept(tok.eos_id)


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("name, arguments", [
    ("get_weather", {"city": "Paris </b> 東京", "days": 3}),
    ("get_weather", {"city": "x", "days": 7, "unit": "celsius", "where": {"lat": -1.5}}),
    ("get_weather", {"city": "", "days": 1, "where": {"lat": 2}}),
    ("ping", {}),
])
def test_an_encoder_rendered_call_passes_token_by_token(tok, mode, name, arguments):
    constraint = build_constraint(OutputRule(tools=[WEATHER, PING], forced=True), tok, VOCAB, mode)
    reasoning = tok.encode("Plan: call it </b>.") + [tok.special_ids["think_close"]] if mode == "thinking" else []
    completion = reasoning + rendered_call(tok, name, arguments)
    feed(constraint, completion)
    finish(constraint, tok)
    message = parse_completion(tok.decode(completion + [tok.eos_id]), mode)
    [call] = message["tool_calls"]
    assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == arguments


def test_two_calls_need_parallel_calls(tok):
    two = rendered_call(tok, "ping", {}, times=2)
    feed(build_constraint(OutputRule(tools=[PING], forced=True), tok, VOCAB, "chat"), two)
    single = build_constraint(OutputRule(tools=[PING], forced=True, parallel=False), tok, VOCAB, "chat")
    with pytest.raises(AssertionError, match="masked"):
        feed(single, two)


def test_invalid_tokens_are_masked(tok):
    constraint = build_constraint(OutputRule(tools=[WEATHER], forced=True), tok, VOCAB, "chat")
    first = constraint.mask()
    assert not first[tok.eos_id] and not first[tok.encode("Hello")[0]] and first[tok.encode("\n\n")[0]]
    ids = rendered_call(tok, "get_weather", {"city": "Oslo", "days": 4})
    name_at = tok.decode(ids).index('name="get_weather"')
    prefix = next(k for k in range(len(ids)) if len(tok.decode(ids[:k])) > name_at + len('name="'))
    probe = constraint.fork()
    feed(probe, ids[:prefix - 1])
    assert not probe.mask()[tok.encode("set")[0]]               # no tool is called "set…"
    days = tok.decode(ids).index('string="false">') + len('string="false">')
    at_days = next(k for k in range(len(ids)) if len(tok.decode(ids[:k])) == days)
    feed(constraint, ids[:at_days])
    mask = constraint.mask()
    assert mask[tok.encode("4")[0]] and not mask[tok.encode("9")[0]] and not mask[tok.encode(" ")[0]]


def test_reasoning_cannot_spell_the_think_close_as_text(tok):
    constraint = build_constraint(OutputRule(schema={"type": "object"}), tok, VOCAB, "thinking")
    feed(constraint, tok.encode("so </think"))
    assert not constraint.mask()[tok.encode(">")[0]]
    assert constraint.mask()[tok.special_ids["think_close"]]       # the token itself ends the reasoning


def test_json_object_reply(tok):
    constraint = build_constraint(OutputRule(schema={"type": "object"}), tok, VOCAB, "chat")
    mask = constraint.mask()
    assert mask[tok.encode("{")[0]] and not mask[tok.encode("[")[0]] and not mask[tok.eos_id]
    feed(constraint, tok.encode('{"a": [1, {"b": null}], "c": "d"}'))
    finish(constraint, tok)


def test_json_reply_keeps_auto_tools_as_the_alternative(tok):
    rule = from_openai({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
                        "function": PING}], "response_format": {"type": "json_object"}}).output
    assert rule == OutputRule(tools=[PING], schema={"type": "object"})
    for completion in (tok.encode('{"k": 1}'), rendered_call(tok, "ping", {})):
        constraint = build_constraint(rule, tok, VOCAB, "chat")
        feed(constraint, completion)
        finish(constraint, tok)


def random_walk(constraint, tok, rng, limit=400) -> str:
    """What a random-weight model writes under the constraint (any allowed token, uniformly), with the
    EOS the engine ends it with once the grammar has `finished`."""
    ids = []
    while not constraint.finished:
        assert len(ids) < limit, "the random walk did not end"
        token = int(rng.choice(np.flatnonzero(constraint.mask())))
        constraint.accept(token)
        ids.append(token)
    return tok.decode(ids if ids[-1] == tok.eos_id else ids + [tok.eos_id])


@pytest.mark.parametrize("seed", range(4))
def test_random_walks_end_in_valid_output(tiny_tok, seed):
    rng = np.random.default_rng(seed)
    vocab = tiny_tok.vocab_size + 40                   # the model's embedding is padded past the tokenizer
    calls = build_constraint(OutputRule(tools=[BOUNDED], forced=True), tiny_tok, vocab, "chat")
    assert not calls.mask()[tiny_tok.vocab_size:].any()
    message = parse_completion(random_walk(calls, tiny_tok, rng), "chat")
    assert message["tool_calls"]
    for call in message["tool_calls"]:
        assert call["function"]["name"] == "book"
        jsonschema.validate(json.loads(call["function"]["arguments"]), BOUNDED["parameters"])
    answer = build_constraint(OutputRule(schema=ANSWER), tiny_tok, vocab, "chat")
    content = parse_completion(random_walk(answer, tiny_tok, rng), "chat")["content"]
    jsonschema.validate(json.loads(content), ANSWER)


def test_fork_is_independent(tok):
    constraint = build_constraint(OutputRule(schema=ANSWER), tok, VOCAB, "chat")
    feed(constraint, tok.encode('{"ok": true'))
    other = constraint.fork()
    feed(other, tok.encode(', "score": 5}'))
    finish(other, tok)
    assert not constraint.finished and not constraint.mask()[tok.eos_id]
    feed(constraint, tok.encode(', "score": 12}'))
    finish(constraint, tok)


def test_accepting_a_masked_token_is_an_error(tok):
    constraint = build_constraint(OutputRule(schema=ANSWER), tok, VOCAB, "chat")
    with pytest.raises(ValueError, match="outside the grammar"):
        constraint.accept(tok.encode("[")[0])


@pytest.mark.parametrize("rule, param", [
    (OutputRule(tools=[{"name": "f", "parameters": {"anyOf": [{"type": "object"}]}}], forced=True), "tools"),
    (OutputRule(tools=[{"name": 'say"hi', "parameters": {}}], forced=True), "tools"),
    (OutputRule(tools=[{"name": "f", "parameters": {"properties": {"x": {"type": "strin"}}}}], forced=True),
     "tools"),
    (OutputRule(tools=[{"name": "f", "parameters": {"properties": [1]}}], forced=True), "tools"),
    (OutputRule(schema={"$ref": "#/nowhere"}), "response_format"),
])
def test_unenforceable_schemas_are_refused_naming_the_field(tok, rule, param):
    with pytest.raises(RequestError) as e:
        build_constraint(rule, tok, VOCAB, "chat")
    assert e.value.param == param and "\n" not in str(e.value)


def test_requests_map_tool_choice_to_output_rules():
    base = {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": PING},
                                                                      {"type": "function", "function": WEATHER}]}
    assert from_openai({**base, "tool_choice": "required"}).output == OutputRule(tools=[PING, WEATHER], forced=True)
    named = from_openai({**base, "tool_choice": {"type": "function", "function": {"name": "ping"}},
                         "parallel_tool_calls": False})
    assert named.output == OutputRule(tools=[PING], forced=True, parallel=False) and len(named.tools) == 2
    assert from_openai({**base, "tool_choice": "auto"}).output is None
    anthropic = {"messages": [{"role": "user", "content": "x"}],
                 "tools": [{"name": "ping", "input_schema": PING["parameters"]}]}
    assert from_anthropic({**anthropic, "tool_choice": {"type": "any"}}).output.forced
    assert not from_anthropic({**anthropic, "tool_choice": {"type": "tool", "name": "ping",
                                                            "disable_parallel_tool_use": True}}).output.parallel
    for request in ({**base, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                    {"messages": base["messages"], "tool_choice": "required"},
                    {**base, "tool_choice": "sometimes"}):
        with pytest.raises(RequestError) as e:
            from_openai(request)
        assert e.value.param == "tool_choice"

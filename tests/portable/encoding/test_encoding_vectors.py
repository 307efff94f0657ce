"""The shared spec vectors: prompts byte for byte, token ids, strict parses and their errors."""

import pytest

from dsv4.portable.encoding import ParseError, encode_messages, parse_completion, render_prompt
from dsv4.portable.encoding.tokens import ASSISTANT, BOS, EOS, THINK_CLOSE, THINK_OPEN, USER

from .encoding_data import load_vectors

VECTORS = load_vectors()
# Reference bugs/quirks we deliberately do not replicate (see the encoder's module docstring);
# the expected outputs below are our documented intended renderings.
DEVIATIONS = {
    "E17_developer_dropped_in_history":
        f"{BOS}{USER}Internal instruction.{ASSISTANT}{THINK_CLOSE}OK.{EOS}{USER}Go.{ASSISTANT}{THINK_OPEN}",
    "E19_dict_arguments_reference_bug": next(
        c["expected_prompt"] for c in VECTORS["encode_cases"] if c["id"] == "E19b_dict_arguments_fixed"),
    "E30_reminder_after_user_quirk":
        f"{BOS}<\uff5clatest_reminder\uff5c>2026-01-01{USER}hi{ASSISTANT}{THINK_OPEN}",
}
ENCODE = {c["id"]: c for c in VECTORS["encode_cases"]}
PARSE = {c["id"]: c for c in VECTORS["parse_cases"]}


def _kwargs(case):
    inp = case["input"]
    return dict(thinking_mode=inp["thinking_mode"], reasoning_effort=inp["reasoning_effort"],
                drop_thinking=inp["drop_thinking"], context=inp.get("context"))


def test_vector_file_is_the_spec_one(vectors):
    assert vectors["tokenizer_sha256"] == "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"
    assert set(DEVIATIONS) == {c["id"] for c in vectors["encode_cases"] if c.get("note")}


@pytest.mark.parametrize("case_id", sorted(ENCODE))
def test_encode_vector(case_id):
    case = ENCODE[case_id]
    prompt = encode_messages(case["input"]["messages"], **_kwargs(case))
    assert prompt == DEVIATIONS.get(case_id, case["expected_prompt"])


@pytest.mark.parametrize("case_id", sorted(set(ENCODE) - set(DEVIATIONS)))
def test_encode_vector_ids(case_id, official):
    case = ENCODE[case_id]
    ids = official.encode_messages(case["input"]["messages"], **_kwargs(case))
    assert len(ids) == case["expected_token_count"]
    if "expected_token_ids" in case:
        assert ids == case["expected_token_ids"]
    # Safe piecewise tokenization equals the reference's whole-string tokenization on benign input.
    assert ids == official.hf.encode(case["expected_prompt"], add_special_tokens=False).ids
    assert official.decode(ids) == case["expected_prompt"]


def test_render_prompt_string_matches_encode_messages():
    case = ENCODE["E01_official_tools_thinking"]
    assert str(render_prompt(case["input"]["messages"], **_kwargs(case))) == case["expected_prompt"]


@pytest.mark.parametrize("case_id", sorted(PARSE))
def test_parse_vector(case_id):
    case = PARSE[case_id]
    text, mode = case["input"]["completion_text"], case["input"]["thinking_mode"]
    if "expected_error" in case:
        with pytest.raises(ParseError, match=case["expected_error"]):
            parse_completion(text, mode)
    else:
        assert parse_completion(text, mode) == case["expected_message"]

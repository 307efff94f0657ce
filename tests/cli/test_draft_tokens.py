"""`--draft-tokens` on generate, chat's session and bench: the answer is plain decoding's, the counts are
reported, bad values are one line."""

import pytest

from .cli_helpers import error_line, json_out


def test_generate_with_drafts_gives_the_plain_answer_and_reports_counts(dsv4_cli, model_args):
    plain = json_out(dsv4_cli("generate", "hello there", *model_args, "-n", 12, "--json", "--draft-tokens", 0))
    spec = json_out(dsv4_cli("generate", "hello there", *model_args, "-n", 12, "--json", "--draft-tokens", 2))
    assert spec["content"] == plain["content"] and spec["finish_reason"] == plain["finish_reason"]
    assert "drafted_tokens" not in plain["usage"]
    usage = spec["usage"]
    assert usage["drafted_tokens"] > 0 and 0 <= usage["accepted_tokens"] <= usage["drafted_tokens"]
    r = dsv4_cli("generate", "hello there", *model_args, "-n", 6, "--draft-tokens", 1)
    assert r.exit_code == 0 and "drafts accepted" in r.stderr


@pytest.mark.parametrize("value", ["8", "-1"])
def test_draft_tokens_out_of_range_is_one_line(dsv4_cli, model_args, value):
    r = dsv4_cli("generate", "hi", *model_args, "--draft-tokens", value)
    assert r.exit_code == 2 and error_line(r) == f"error: --draft-tokens must be in 0..7, got {value}"


def test_bench_reports_each_draft_count(dsv4_cli, model_args):
    r = dsv4_cli("bench", *model_args, "-p", 16, "-g", 8, "--draft-tokens", "0,2", "--json")
    assert r.exit_code == 0, r.output
    rows = json_out(r)["speculative"]
    assert [row["draft_tokens"] for row in rows] == [0, 2]
    assert rows[0]["drafted"] == 0 and rows[0]["speedup"] == 1.0
    assert rows[1]["drafted"] > 0 and rows[1]["tokens"] == 8 and rows[1]["tokens_per_step"] >= 1.0
    bad = dsv4_cli("bench", *model_args, "--draft-tokens", "1,x")
    assert bad.exit_code == 2 and "comma-separated integers" in error_line(bad)

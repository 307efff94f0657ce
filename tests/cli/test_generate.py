"""`dsv4 generate`: output equals the library's own greedy generation, streaming == --json, stdin, sampling
flags, --stop, and one-line errors with their exit codes."""

import re

import numpy as np
import pytest
from .cli_helpers import AUTO_CPU, error_line, json_out

import dsv4
from dsv4.cli.session import FIRST_PREFILL
from dsv4.portable.encoding import StreamParser

PROMPT = "Tell me about the sea"


@pytest.fixture(scope="module")
def expected(tiny_dir):
    """Greedy answer computed directly with the library (no CLI code involved)."""
    m = dsv4.load(tiny_dir, context=256)
    tok = m.tokenizer
    ids = tok.encode_messages([{"role": "user", "content": PROMPT}], thinking_mode="chat")
    res = m.generate(ids, max_tokens=10, stop_ids=[tok.eos_id])
    parser = StreamParser("chat")
    parser.feed(tok.decode(res.tokens))
    parser.finish()
    return {"content": parser.message()["content"], "tokens": len(res.tokens), "prompt": len(ids)}


def test_json_matches_library_generation(dsv4_cli, model_args, expected):
    out = json_out(dsv4_cli("generate", PROMPT, *model_args, "-n", 10, "--json"))
    assert out["content"] == expected["content"] and out["content"].strip()
    assert out["usage"]["prompt_tokens"] == expected["prompt"]
    assert out["usage"]["completion_tokens"] == expected["tokens"]
    assert out["finish_reason"] == ("length" if expected["tokens"] == 10 else "stop")
    assert out["backend"] == AUTO_CPU and out["tool_calls"] == []
    assert out["timings"]["decode_tok_s"] > 0


def test_streamed_stdout_is_the_answer_and_stats_go_to_stderr(dsv4_cli, model_args, expected):
    r = dsv4_cli("generate", PROMPT, *model_args, "-n", 10)
    assert r.exit_code == 0, r.output
    assert r.stdout == expected["content"] + "\n"
    assert f"prompt {expected['prompt']} tokens" in r.stderr and "tok/s" in r.stderr


STATS = re.compile(rf"(\d+) tokens? (?:· ([\d.]+) tok/s )?· prompt (\d+) tokens? in [\d.]+ s \(([\d.]+) tok/s"
                   rf"(; {re.escape(FIRST_PREFILL)})?\) · peak RSS ([\d.]+) (MiB|GiB) · "
                   rf"context (\d+)/256 · (length|stop) · {AUTO_CPU}/float32")


def test_stats_line_has_prompt_rate_and_peak_memory(dsv4_cli, model_args, expected):
    r = dsv4_cli("generate", PROMPT, *model_args, "-n", 10)
    m = STATS.fullmatch(r.stderr.strip())
    assert m, r.stderr
    n, rate, prompt, prompt_rate, warm, peak, unit, used, _ = m.groups()
    assert int(n) == expected["tokens"] and int(prompt) == expected["prompt"]
    assert float(rate) > 0 and float(prompt_rate) > 0 and warm                # one turn: the first prefill
    assert float(peak) * (1 << (20 if unit == "MiB" else 30)) > 50 << 20
    assert int(used) == expected["prompt"] + expected["tokens"]


def test_one_token_has_no_decode_rate(dsv4_cli, model_args):
    """`-n 1`: "1 token" (not "1 tokens · 0.0 tok/s"), and null as the decode rate in JSON."""
    r = dsv4_cli("generate", PROMPT, *model_args, "-n", 1)
    assert r.exit_code == 0, r.output
    m = STATS.fullmatch(r.stderr.strip())
    assert m and r.stderr.startswith("1 token · prompt ") and m.group(2) is None, r.stderr
    out = json_out(dsv4_cli("generate", PROMPT, *model_args, "-n", 1, "--json"))
    assert out["usage"]["completion_tokens"] == 1 and out["timings"]["decode_tok_s"] is None
    assert out["timings"]["prefill_tok_s"] > 0 and out["timings"]["first_prefill"] is True
    assert out["peak_rss_bytes"] > 50 << 20


def test_prompt_from_stdin(dsv4_cli, model_args, expected):
    out = json_out(dsv4_cli("generate", *model_args, "-n", 10, "--json", input=PROMPT))
    assert out["content"] == expected["content"]


def test_sampling_seed_reproduces_and_seeds_differ(dsv4_cli, model_args):
    flags = [*model_args, "-n", 12, "--json", "--temperature", 1.5, "--top-k", 200, "--top-p", 0.95,
             "--min-p", 0.01, "--repetition-penalty", 1.1]
    a = json_out(dsv4_cli("generate", "Hi", *flags, "--seed", 5))["content"]
    b = json_out(dsv4_cli("generate", "Hi", *flags, "--seed", 5))["content"]
    c = json_out(dsv4_cli("generate", "Hi", *flags, "--seed", 6))["content"]
    assert a == b and a != c


def test_stop_string_cuts_the_answer(dsv4_cli, model_args, expected):
    full = expected["content"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    out = json_out(dsv4_cli("generate", PROMPT, *model_args, "-n", 10, "--json", "--stop", stop))
    assert out["content"] == full[:full.index(stop)]
    assert out["finish_reason"] == "stop"


def test_thinking_mode_reports_reasoning(dsv4_cli, model_args):
    out = json_out(dsv4_cli("generate", PROMPT, *model_args, "-n", 6, "--json", "--mode", "thinking"))
    assert out["mode"] == "thinking"
    assert out["reasoning"].strip() or out["content"].strip()
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("args,code,message", [
    (["--model", "/no/such/dir"], 3,
     "error: model directory not found: /no/such/dir (pass a checkpoint directory"),
    (["--backend", "tpu"], 4, "error: unknown backend 'tpu'; choose one of auto, cpu, cuda, mlx, onnx, reference"),
    (["--top-p", "0"], 2, "error: --top-p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], 2, "error: --temperature must be 0 (greedy) or at least 0.0001, got -1.0"),
    (["--max-tokens", "0"], 2, "error: --max-tokens must be ≥ 1, got 0"),
    (["--mode", "fast"], 2, "error: --mode must be one of chat, thinking, max, got 'fast'"),
    (["--max-tokens", "many"], 2, "error: Invalid value for '--max-tokens' / '-n': "),
    (["--frobnicate"], 2, "error: No such option: --frobnicate"),
])
def test_user_errors_are_one_line(dsv4_cli, tiny_dir, args, code, message):
    base = ["generate", "hello", "--model", str(tiny_dir), "--context", "256"]
    r = dsv4_cli(*base, *args)
    assert r.exit_code == code
    assert error_line(r).startswith(message)
    assert r.stdout == ""


def test_prompt_longer_than_context(dsv4_cli, tiny_dir):
    words = " ".join(str(w) for w in np.random.default_rng(0).integers(1000, 9999, 80))
    r = dsv4_cli("generate", words, "--model", tiny_dir, "--context", 32)
    assert r.exit_code == 6
    assert error_line(r).startswith("error: the prompt is ") and "context holds 32; raise --context" in r.stderr


def test_empty_stdin(dsv4_cli, model_args):
    r = dsv4_cli("generate", *model_args, input="  \n")
    assert r.exit_code == 2 and error_line(r) == "error: the prompt is empty"


def test_memory_refusal_and_force(dsv4_cli, model_args):
    r = dsv4_cli("generate", "hi", *model_args, "-n", 2, env={"DSV4_MEMORY_LIMIT": "20M"})
    assert r.exit_code == 5
    line = error_line(r)
    assert line.startswith(f"error: not enough memory: the {AUTO_CPU} backend needs about ")
    assert "but 20.0 MiB is free (DSV4_MEMORY_LIMIT)" in line and line.endswith("or pass --force")
    forced = dsv4_cli("generate", "hi", *model_args, "-n", 2, "--force", env={"DSV4_MEMORY_LIMIT": "20M"})
    assert forced.exit_code == 0, forced.output


def test_default_model_is_the_demo_with_its_notice(dsv4_cli):
    """No --model: the shipped demo checkpoint (real V4 tokenizer), announced on one stderr line."""
    out = dsv4_cli("generate", "Hello", "-n", 2, "--context", 64, "--json")
    assert out.exit_code == 0, out.output
    assert out.stderr.splitlines()[0].startswith("note: the demo model is a tiny DeepSeek V4 trained on")
    data = json_out(out)
    assert "/demo-" in data["model"] and data["usage"]["prompt_tokens"] >= 4

"""The prompt cache that survives restarts (`--prompt-cache-dir`, `dsv4 chat --prompt-cache`): a restarted
server or chat reports the prompt tokens it read from disk, in both APIs' usage and in the Anthropic
stream's `message_start` and `message_delta` alike; another model's states are never used."""

import re
import sys

import httpx
import pytest

import dsv4
from dsv4.cli.server import build_app
from dsv4.portable.prompt_store import StateStore

from .server_helpers import API_KEY, live, openai_prompt, random_text

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def serving(model, directory):
    """A fresh server process stand-in: a new app, engine and memory cache over `directory`."""
    return live(build_app(model, model_name="demo", api_key=API_KEY, prefill_chunk=64,
                          prompt_store=StateStore(model, directory, 1 << 30)))


def chat_usage(url, request):
    r = httpx.post(url + "/v1/chat/completions", json=request, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def anthropic_stream_usage(url, request):
    """(message_start usage, message_delta usage) of a streamed Anthropic message."""
    events = {}
    with httpx.stream("POST", url + "/v1/messages", json={**request, "stream": True}, headers=HEADERS,
                      timeout=120) as r:
        assert r.status_code == 200
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name in ("message_start", "message_delta"):
                events[name] = httpx.Response(200, content=line[6:]).json()
    return events["message_start"]["message"]["usage"], events["message_delta"]["usage"]


def test_a_restarted_server_reads_the_prompt_from_disk(demo_model, tmp_path):
    req = {"model": "demo", "max_tokens": 3, "temperature": 0,
           "messages": [{"role": "user", "content": random_text(6)}]}
    n = len(openai_prompt(demo_model.tokenizer, req))
    with serving(demo_model, tmp_path) as url:
        first = chat_usage(url, req)
    assert first["prompt_tokens"] == n and first["prompt_tokens_details"]["cached_tokens"] == 0
    assert list(tmp_path.glob("*.safetensors"))
    with serving(demo_model, tmp_path) as url:
        again = chat_usage(url, req)
        longer = chat_usage(url, {**req, "messages": req["messages"] + [
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": random_text(2)}]})
    assert again["prompt_tokens_details"]["cached_tokens"] == n
    assert again["completion_tokens"] == first["completion_tokens"]
    assert 0 < longer["prompt_tokens_details"]["cached_tokens"] < longer["prompt_tokens"]


def test_anthropic_usage_agrees_in_message_start_and_message_delta(demo_model, tmp_path):
    req = {"model": "demo", "max_tokens": 3, "temperature": 0, "system": random_text(3),
           "messages": [{"role": "user", "content": random_text(5)}]}
    with serving(demo_model, tmp_path) as url:
        cold_start, cold_delta = anthropic_stream_usage(url, req)
    assert cold_start["cache_read_input_tokens"] == cold_delta["cache_read_input_tokens"] == 0
    with serving(demo_model, tmp_path) as url:
        start, delta = anthropic_stream_usage(url, req)
        r = httpx.post(url + "/v1/messages", json=req, headers=HEADERS, timeout=120)
    total = cold_start["input_tokens"]
    assert start["cache_read_input_tokens"] == delta["cache_read_input_tokens"] == total
    assert start["input_tokens"] == delta["input_tokens"] == 0
    assert r.json()["usage"]["cache_read_input_tokens"] == total


def test_a_different_model_does_not_use_the_saved_states(demo_model, tmp_path, caplog):
    req = {"model": "demo", "max_tokens": 2, "temperature": 0,
           "messages": [{"role": "user", "content": random_text(4)}]}
    with serving(demo_model, tmp_path) as url:
        chat_usage(url, req)
    other = dsv4.load("demo", context=384, dtype="bfloat16")            # other numerics: another fingerprint
    with serving(other, tmp_path) as url:
        assert chat_usage(url, req)["prompt_tokens_details"]["cached_tokens"] == 0
    with serving(demo_model, tmp_path) as url:                            # the first model's files are intact
        assert chat_usage(url, req)["prompt_tokens_details"]["cached_tokens"] > 0
    assert "prompt cache" not in caplog.text


def test_bad_prompt_cache_options_are_one_line_errors(dsv4_cli, tmp_path):
    r = dsv4_cli("serve", "--prompt-cache-dir", str(tmp_path), "--prompt-cache-gb", "0")
    assert r.exit_code == 2 and r.stderr.strip() == "error: --prompt-cache-gb must be > 0, got 0"
    (tmp_path / "file").write_text("x")
    r = dsv4_cli("chat", "--model", "demo", "--prompt-cache", str(tmp_path / "file"), input="")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot use {tmp_path / 'file'} as a prompt cache directory: it is not a directory"


def test_chat_reuses_the_prompt_cache_across_runs(tiny_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    stats = re.compile(r"prompt (\d+) tokens?(?:, (\d+) cached,)? in ")

    def one_turn(text):
        child = pexpect.spawn(sys.executable, ["-m", "dsv4.cli", "chat", "--model", str(tiny_dir), "--context", "256",
                                               "--max-tokens", "4", "--temperature", "0",
                                               "--prompt-cache", str(tmp_path)],
                              encoding="utf-8", timeout=60, dimensions=(40, 200))
        try:
            child.expect_exact(">>> ")
            child.sendline(text)
            child.expect(stats)
            prompt, cached = int(child.match.group(1)), int(child.match.group(2) or 0)
            child.expect_exact(">>> ")
            child.sendline("/exit")
            child.expect(pexpect.EOF)
        finally:
            if child.isalive():
                child.terminate(force=True)
        return prompt, cached

    prompt, cached = one_turn("Hello there, cache.")
    assert cached == 0
    again, cached = one_turn("Hello there, cache.")
    assert again == prompt and cached >= prompt - 1                  # at most the last token is re-fed

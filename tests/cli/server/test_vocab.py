"""Token ids and the vocabulary at the HTTP boundary: a token-id prompt with an id the model does not have
is a 400 naming it, and a model whose embedding is padded past its tokenizer may sample an id the
tokenizer cannot decode without the request failing (the id reads as U+FFFD)."""

import json

import httpx
import pytest
from .server_helpers import API_KEY, ScriptedModel, live, openai_prompt

from dsv4.cli.server import build_app

OK = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def padded(demo_model):
    """(model, base URL): the scripted stand-in with 64 embedding rows past the tokenizer's last id."""
    model = ScriptedModel(demo_model.tokenizer)
    model.vocab = model.tokenizer.vocab_size + 64
    with live(build_app(model, model_name="padded", api_key=API_KEY)) as url:
        yield model, url


def script(model, prompt_ids, before: str, after: str) -> int:
    """Make the model write `before`, one padding id, `after` and EOS; returns the padding id."""
    tok = model.tokenizer
    pad = tok.vocab_size + 7
    ids = tok.hf.encode(before, add_special_tokens=False).ids + [pad]
    ids += tok.hf.encode(after, add_special_tokens=False).ids + [tok.eos_id]
    model.script.clear()
    model.script.update({len(prompt_ids) + i: t for i, t in enumerate(ids)})
    return pad


@pytest.mark.parametrize("bad", [129280, 10 ** 9, -3])
def test_a_token_id_prompt_outside_the_vocabulary_is_a_400_naming_the_id(padded, bad):
    _, url = padded
    r = httpx.post(f"{url}/v1/completions", headers=OK, timeout=30,
                   json={"model": "padded", "prompt": [0, 5, bad, 6], "max_tokens": 2})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == (f"'prompt' holds token id {bad}, outside the vocabulary of 129280 ids "
                                f"(0..129279)")
    assert (error["type"], error["param"]) == ("invalid_request_error", "prompt")
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200


def test_a_sampled_padding_id_reads_as_the_replacement_character(padded):
    model, url = padded
    req = {"model": "padded", "messages": [{"role": "user", "content": "Say hi."}],
           "thinking": {"type": "disabled"}, "logprobs": True, "max_tokens": 32}
    pad = script(model, openai_prompt(model.tokenizer, req), "Hello", " world")
    r = httpx.post(f"{url}/v1/chat/completions", headers=OK, json=req, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "Hello\ufffd world" and choice["finish_reason"] == "stop"
    entries = choice["logprobs"]["content"]
    assert {"token": "\ufffd", "bytes": list("\ufffd".encode())}.items() <= entries[1].items()

    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=OK, json={**req, "stream": True},
                      timeout=30) as s:
        frames = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert s.status_code == 200 and all("error" not in f for f in frames)
    assert "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"]) == \
        "Hello\ufffd world"

    raw = {"model": "padded", "prompt": [0, 5, 6], "max_tokens": 3}
    model.script.clear()
    model.script.update({3: 5, 4: pad, 5: 6})
    r = httpx.post(f"{url}/v1/completions", headers=OK, json=raw, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == model.tokenizer.decode([5, pad, 6])
    assert "\ufffd" in r.json()["choices"][0]["text"]

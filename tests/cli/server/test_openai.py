"""OpenAI endpoints on the demo model, driven by the official `openai` client."""

import concurrent.futures
import time

import httpx

from .server_helpers import API_KEY, openai_prompt, random_text


def _chat_request(text, **kw):
    return {"model": "demo", "messages": [{"role": "user", "content": text}], **kw}


def test_chat_non_streaming(demo_server, demo_model, openai_client):
    req = _chat_request(random_text(), max_tokens=5, temperature=0, reasoning_effort="none", logprobs=True,
                        top_logprobs=2)
    r = openai_client(demo_server).chat.completions.create(**req)
    choice = r.choices[0]
    assert r.usage.prompt_tokens == len(openai_prompt(demo_model.tokenizer, req))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == (5 if choice.finish_reason == "length" else r.usage.completion_tokens)
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-9
               for e in choice.logprobs.content)
    assert isinstance(choice.message.content, str) and "｜DSML｜" not in choice.message.content
    # greedy + the prefix cache: the same request again gives the same text, with the prompt cached
    again = openai_client(demo_server).chat.completions.create(**req)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens


def test_chat_streaming_matches_non_streaming(demo_server, openai_client):
    req = _chat_request(random_text(), max_tokens=6, temperature=0, reasoning_effort="high")   # thinking
    client = openai_client(demo_server)
    full = client.chat.completions.create(**req)
    chunks = list(client.chat.completions.create(**req, stream=True, stream_options={"include_usage": True}))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == full.choices[0].message.reasoning_content
    assert content == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert finals[0].usage.prompt_tokens == full.usage.prompt_tokens


def test_eight_concurrent_streams(demo_server, demo_model, openai_client):
    client = openai_client(demo_server)
    before = httpx.get(demo_server + "/health").json()
    reqs = [_chat_request(random_text(2), max_tokens=4 + k % 3, temperature=0.7, seed=k,
                          reasoning_effort="none") for k in range(8)]

    def run(req):
        stream = client.chat.completions.create(**req, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        return chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, reqs))
    for req, (usage, finishes) in zip(reqs, results):
        assert usage.prompt_tokens == len(openai_prompt(demo_model.tokenizer, req))
        assert finishes[-1] in ("length", "stop")
        if finishes[-1] == "length":
            assert usage.completion_tokens == req["max_tokens"]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    after = httpx.get(demo_server + "/health").json()
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert rows > steps, "concurrent streams were never decoded in one batch"
    assert after["running"] == 0 and after["waiting"] == 0


def test_disconnect_mid_stream_does_not_disturb_the_next_request(demo_server, openai_client):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = httpx.get(demo_server + "/health").json()
    body = _chat_request(random_text(), max_tokens=300, temperature=0, stream=True, reasoning_effort="high")
    with httpx.stream("POST", demo_server + "/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:") and "reasoning_content" in line
            if seen == 2:
                break
    deadline = time.monotonic() + 30
    while (health := httpx.get(demo_server + "/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health["running"] == 0, "the abandoned stream is still generating"
    assert health["decode_rows"] - before["decode_rows"] < 100, "generation was not cancelled"
    req = _chat_request(random_text(), max_tokens=4, temperature=0, reasoning_effort="none")
    client = openai_client(demo_server)
    first = client.chat.completions.create(**req)
    second = client.chat.completions.create(**req, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
    assert first.choices[0].finish_reason == "stop" or first.usage.completion_tokens == 4
    assert text == first.choices[0].message.content


def test_completions_and_models(demo_server, demo_model, openai_client):
    client = openai_client(demo_server)
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    text = random_text()
    r = client.completions.create(model="demo", prompt=text, max_tokens=4, temperature=0, logprobs=2)
    assert r.usage.prompt_tokens == 1 + len(demo_model.tokenizer.encode(text))
    assert r.choices[0].finish_reason in ("length", "stop")
    assert len(r.choices[0].logprobs.token_logprobs) == r.usage.completion_tokens
    stream = client.completions.create(model="demo", prompt=text, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    ids = [demo_model.tokenizer.bos_id] + demo_model.tokenizer.encode(text)
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert by_ids.usage.prompt_tokens_details.cached_tokens == len(ids)


def test_health_needs_no_key(demo_server):
    health = httpx.get(demo_server + "/health").json()
    assert health["status"] == "ok" and health["model"] == "demo" and health["batching"] is True

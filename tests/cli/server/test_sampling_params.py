"""Sampling parameters clients send, through the real clients on the demo model: n > 1 (one prefill,
choices that differ, usage summed), presence/frequency penalties, logit_bias, Anthropic top_k; and the
server's greedy answer is the chat REPL's."""

import httpx

from dsv4.cli.session import ChatSession

from .server_helpers import API_KEY, openai_prompt, random_text


def _chat(text, **kw):
    return {"model": "demo", "messages": [{"role": "user", "content": text}], **kw}


def _prefill_steps(url) -> int:
    return httpx.get(url + "/health", timeout=30).json()["prefill_steps"]


def test_n_choices_non_streaming_share_one_prefill(demo_server, demo_model, openai_client):
    req = _chat(random_text(30), max_tokens=6, temperature=1.0, seed=11, n=3, reasoning_effort="none",
                logprobs=True)
    before = _prefill_steps(demo_server)
    r = openai_client(demo_server).chat.completions.create(**req)
    prompt = len(openai_prompt(demo_model.tokenizer, req))
    assert _prefill_steps(demo_server) - before == -(-prompt // 64)        # chunks of 64, read once
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.prompt_tokens == prompt
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices) > 6
    single = openai_client(demo_server).chat.completions.create(**{**req, "n": 1})
    assert single.choices[0].message.content == r.choices[0].message.content     # choice 0 is the n = 1 answer


def test_n_choices_streaming_and_legacy_completions(demo_server, openai_client):
    client = openai_client(demo_server)
    req = _chat(random_text(), max_tokens=5, temperature=1.0, seed=3, n=2, reasoning_effort="none")
    full = client.chat.completions.create(**req)
    chunks = list(client.chat.completions.create(**req, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == full.choices[i].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.choices[0].index for c in finals) == [0, 1]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    legacy = client.completions.create(model="demo", prompt=random_text(), max_tokens=4, temperature=1.0, seed=5, n=3)
    assert [c.index for c in legacy.choices] == [0, 1, 2] and legacy.usage.completion_tokens <= 12


def test_logit_bias_and_penalties(demo_server, demo_model, openai_client):
    client = openai_client(demo_server)
    word = demo_model.tokenizer.encode(" maple")[-1]
    r = client.chat.completions.create(**_chat(random_text(), max_tokens=4, temperature=1.0, reasoning_effort="none",
                                               logit_bias={str(word): 100}, logprobs=True))
    assert [e.bytes for e in r.choices[0].logprobs.content] == [list(demo_model.tokenizer.token_bytes(word))] * 4
    # greedy under penalties picks the best penalized logit: the logprobs are the model's own, so every
    # reported alternative's logprob minus its penalty (count·frequency + presence) is no better
    frequency, presence = 1.5, 0.5
    r = client.chat.completions.create(**_chat(random_text(), max_tokens=12, temperature=0, reasoning_effort="none",
                                               logprobs=True, top_logprobs=20, frequency_penalty=frequency,
                                               presence_penalty=presence))
    counts: dict = {}

    def score(entry):
        n = counts.get(bytes(entry.bytes), 0)
        return entry.logprob - n * frequency - (presence if n else 0)

    for entry in r.choices[0].logprobs.content:
        assert all(score(alt) <= score(entry) + 1e-6 for alt in entry.top_logprobs)
        counts[bytes(entry.bytes)] = counts.get(bytes(entry.bytes), 0) + 1
    assert max(counts.values()) < 12


def test_anthropic_top_k_one_is_greedy(demo_server, anthropic_client):
    client = anthropic_client(demo_server)
    text = random_text()
    kw = dict(model="demo", max_tokens=6, messages=[{"role": "user", "content": text}])
    greedy = client.messages.create(**kw, extra_body={"temperature": 0})      # (this SDK has no temperature)
    top1 = client.messages.create(**kw, extra_body={"temperature": 1.0, "top_k": 1})
    assert [b.model_dump() for b in top1.content] == [b.model_dump() for b in greedy.content]


def test_server_greedy_answer_is_the_chat_repl_answer(demo_server, demo_model):
    text = random_text()
    session = ChatSession(demo_model, mode="chat", max_tokens=8)
    local = session.turn(text)
    r = httpx.post(demo_server + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                   json=_chat(text, max_tokens=8, temperature=0, reasoning_effort="none")).json()
    assert r["choices"][0]["message"]["content"] == local.content
    assert r["usage"]["completion_tokens"] == local.completion_tokens

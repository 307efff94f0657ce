"""Anthropic Messages on the demo model, driven by the official `anthropic` client."""

from .server_helpers import anthropic_prompt, random_text


def test_messages_non_streaming_and_streaming_agree(demo_server, demo_model, anthropic_client):
    client = anthropic_client(demo_server)
    req = {"model": "demo", "max_tokens": 5, "extra_body": {"temperature": 0}, "system": random_text(2),
           "messages": [{"role": "user", "content": random_text()}]}
    full = client.messages.create(**req)
    prompt_len = len(anthropic_prompt(demo_model.tokenizer, {**req, **req["extra_body"]}))
    assert full.usage.input_tokens + full.usage.cache_read_input_tokens == prompt_len
    assert full.stop_reason in ("max_tokens", "end_turn")
    assert full.usage.output_tokens == 5 or full.stop_reason == "end_turn"
    with client.messages.stream(**req) as stream:
        events = [ev.type for ev in stream]
        streamed = stream.get_final_message()
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert events.count("content_block_start") == events.count("content_block_stop") == len(streamed.content)
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in full.content]
    assert streamed.usage.output_tokens == full.usage.output_tokens
    assert streamed.usage.cache_read_input_tokens == prompt_len          # the prompt state was reused


def test_thinking_disabled_gives_text_only(demo_server, anthropic_client):
    msg = anthropic_client(demo_server).messages.create(
        model="demo", max_tokens=4, extra_body={"temperature": 0}, thinking={"type": "disabled"},
        messages=[{"role": "user", "content": random_text()}])
    assert [b.type for b in msg.content] in (["text"], [])
    assert all("｜DSML｜" not in b.text for b in msg.content)

"""`dsv4.encoding`, the public encoding module promised by the API (issue 3), re-exports portable.encoding."""

import dsv4.encoding
import dsv4.portable.encoding as impl


def test_dsv4_encoding_is_the_public_name_of_the_encoding_api():
    assert dsv4.encoding.__all__ == impl.__all__ and len(impl.__all__) > 10
    for name in impl.__all__:
        assert getattr(dsv4.encoding, name) is getattr(impl, name), name


def test_encode_and_parse_through_the_public_module():
    from dsv4.encoding import encode_messages, parse_completion
    prompt = encode_messages([{"role": "user", "content": "Hi there"}], thinking_mode="chat")
    assert prompt.startswith("<｜begin▁of▁sentence｜>") and "Hi there" in prompt
    msg = parse_completion("Hello back<｜end▁of▁sentence｜>", thinking_mode="chat")
    assert msg["role"] == "assistant" and msg["content"] == "Hello back"

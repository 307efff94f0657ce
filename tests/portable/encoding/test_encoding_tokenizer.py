"""Tokenizer wrapper: the official file, special ids, decoding, streaming detokenization, and the
tiny test tokenizer."""

import pytest

from dsv4.portable.encoding import (OFFICIAL_TOKENIZER_SHA256, IncrementalDetokenizer, Tokenizer,
                                    build_test_tokenizer, load_tokenizer, official_tokenizer_path,
                                    write_test_tokenizer)
from dsv4.portable.encoding.tokenizer import file_sha256
from dsv4.portable.encoding.tokens import CONTROL_TOKENS

SAMPLES = ["plain ascii", "héllo wörld", "你好，世界。深度求索", "カタカナ ひらがな", "emoji 🤖🧪👩‍👩‍👧",
           "mixed 12345 ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\ttabs", "a" * 50 + "中" * 30]


def test_packaged_tokenizer_is_the_official_file():
    assert file_sha256(official_tokenizer_path()) == OFFICIAL_TOKENIZER_SHA256


def test_special_ids_come_from_the_tokenizer(official):
    assert official.special_ids == {
        "bos": 0, "eos": 1, "user": 128803, "assistant": 128804, "think_open": 128821,
        "think_close": 128822, "dsml": 128825, "latest_reminder": 128828, "task_action": 128829,
        "task_query": 128830, "task_authority": 128831, "task_domain": 128832, "task_title": 128836,
        "task_read_url": 128845}
    assert (official.bos_id, official.eos_id, official.vocab_size) == (0, 1, 129280)


def test_plain_text_pieces_from_the_spec(official):
    assert official.encode("<tool_result>") == [30, 72461, 46148, 32]
    assert official.encode("</tool_result>") == [1718, 72461, 46148, 32]
    assert official.encode("\n\n") == [271] and official.encode("\n") == [201]
    assert official.encode("") == []


def test_from_dir_prefers_the_model_tokenizer(tmp_path, official):
    assert Tokenizer.from_dir(tmp_path) is official  # no tokenizer.json: the packaged official one
    write_test_tokenizer(tmp_path, vocab_size=600)
    own = Tokenizer.from_dir(tmp_path)
    assert own.vocab_size <= 600 and own.special_ids["user"] < 600
    assert load_tokenizer(tmp_path).vocab_size == own.vocab_size
    assert load_tokenizer(tmp_path / "tokenizer.json").vocab_size == own.vocab_size
    assert (tmp_path / "tokenizer_config.json").is_file()


def test_non_v4_tokenizer_is_refused():
    from tokenizers import Tokenizer as HF, models
    with pytest.raises(ValueError, match="not a DeepSeek V4 tokenizer"):
        Tokenizer(HF(models.BPE()).to_str())


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(official, tiny, text):
    for tok in (official, tiny):
        assert tok.decode(tok.encode(text)) == text


def test_token_bytes_agree_with_decode(official):
    # Python's "replace" and the Rust decoder substitute invalid UTF-8 the same way.
    for token_id in range(0, official.vocab_size, 7):
        assert official.token_bytes(token_id).decode("utf-8", "replace") == official.decode([token_id])


@pytest.mark.parametrize("unknown", [984, 1023, 5000, -1])
def test_ids_the_tokenizer_lacks_decode_to_the_replacement_character(tiny, unknown):
    """A padded embedding (tiny models: 1,024 ids, 984 tokens) lets a model sample an id the tokenizer
    does not have: every decoding path shows it as U+FFFD instead of raising or dropping it."""
    assert tiny.vocab_size == 984
    ids = tiny.encode("ok") + [unknown] + tiny.encode("中")
    assert tiny.decode(ids) == "ok\ufffd中"
    assert tiny.token_bytes(unknown) == "\ufffd".encode()
    detok = IncrementalDetokenizer(tiny)
    assert detok.push_many(ids) + detok.flush() == "ok\ufffd中"
    first = tiny.encode("🤖")[:1]                      # the first byte of a four-byte character
    detok = IncrementalDetokenizer(tiny)
    assert detok.push_many(first + [unknown]) + detok.flush() == tiny.decode(first + [unknown]) == "\ufffd\ufffd"


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_detokenizer_never_splits_characters(official, tiny, text):
    for tok in (official, tiny):
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.push(i) for i in ids]
        pieces.append(detok.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_keeps_control_tokens(official):
    ids = official.encode_messages([{"role": "user", "content": "日本"}], thinking_mode="thinking")
    detok = IncrementalDetokenizer(official)
    assert detok.push_many(ids) + detok.flush() == official.decode(ids)


def test_incremental_detokenizer_flushes_a_dangling_byte(official):
    ids = official.encode("🤖")
    detok = IncrementalDetokenizer(official)
    partial = "".join(detok.push(i) for i in ids[:-1]) if len(ids) > 1 else ""
    assert detok.flush() in ("", "\ufffd") and "\ufffd" not in partial


# ------------------------------------------------------------------ tiny test tokenizer


def test_tiny_tokenizer_fits_a_tiny_vocab(tiny):
    assert tiny.vocab_size <= 1024
    assert (tiny.bos_id, tiny.eos_id, tiny.hf.token_to_id("<\uff5c\u2581pad\u2581\uff5c>")) == (0, 1, 2)
    for token in CONTROL_TOKENS:
        assert tiny.hf.token_to_id(token) is not None
    ids = tiny.encode_messages([{"role": "user", "content": "你好 world 123"}], thinking_mode="chat")
    assert max(ids) < 1024


def test_tiny_tokenizer_is_deterministic_and_sized():
    assert build_test_tokenizer(700).to_str() == build_test_tokenizer(700).to_str()
    assert build_test_tokenizer(700).get_vocab_size() <= 700
    with pytest.raises(ValueError):
        build_test_tokenizer(100)


@pytest.mark.parametrize("text", SAMPLES + ["x = foo(1, 2)  # comment\n    return -bar.NET"])
def test_tiny_pretokenization_equals_official(official, tiny, text):
    official_split = [p for p, _ in official.hf.pre_tokenizer.pre_tokenize_str(text)]
    tiny_split = [p for p, _ in tiny.hf.pre_tokenizer.pre_tokenize_str(text)]
    assert official_split == tiny_split


def test_write_test_tokenizer_to_a_json_path(tmp_path):
    path = write_test_tokenizer(tmp_path / "tok.json", vocab_size=512)
    assert path.is_file() and Tokenizer.from_file(path).vocab_size <= 512

"""A small V4-compatible tokenizer for tiny test checkpoints (encoding spec §6.4).

Tiny models have a vocabulary of about a thousand ids, so they cannot use the 129,280-entry official
tokenizer.  This one has the same pre-tokenizer and byte-level decoder, BOS/EOS/pad at ids 0/1/2 and
every control token the encoder emits, with all ids below `vocab_size`.  Its merges are learned from a
small fixed corpus (English, code, JSON, CJK, digits and the V4 prompt markup), so building it is
deterministic and takes a fraction of a second.  Ids differ from the official tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .templates import TOOLS_TEMPLATE
from .tokens import BOS, CONTROL_TOKENS, EOS, PAD

# The official pre-tokenizer's third split pattern (spec §6.1), one alternative per line.
_WORD_PATTERN = "|".join([
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+",
    r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+",
    r" ?[\p{P}\p{S}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the weather in Beijing today?",
    "You are a helpful assistant. Answer the question step by step, then give the final answer.",
    "Let me think about this problem carefully before I write the answer in one short sentence.",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]\n",
    "    return quicksort([x for x in items[1:] if x < pivot]) + [pivot]\n",
    "for i in range(10):\n    print(f\"{i}: {i * i}\")\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "unit": "celsius"}}',
    '{"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}',
    "The temperature is 22 degrees, humidity 45%, and the date is 2026-02-21 at 07:30.",
    "1234567890 3.14159 2718 1000000 42 7 99 2024 2025 2026",
    "你好，世界。今天天气很好，我们去公园散步吧。深度求索公司创造了这个助手。",
    "こんにちは、世界。カタカナとひらがなのテストです。",
    "Zürich, Málaga, São Paulo, Kraków – naïve café façade.",
    TOOLS_TEMPLATE.replace("{schemas}", '{"name": "search", "parameters": {"type": "object"}}'),
    '<tool_result>{"temperature": 22, "condition": "sunny"}</tool_result>',
]


def build_test_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """An HF tokenizer with V4's structure and control tokens, all ids < vocab_size."""
    extra = [t for t in CONTROL_TOKENS if t not in (BOS, EOS)]
    base_size = vocab_size - len(extra)
    if base_size < 256 + 3:
        raise ValueError(f"vocab_size {vocab_size} is too small: need at least {256 + 3 + len(extra)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BOS, EOS, PAD])
    tok.train_from_iterator(_CORPUS, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tok


def write_test_tokenizer(path, vocab_size: int = 1024) -> Path:
    """Write tokenizer.json (and a matching tokenizer_config.json) into directory `path`, or to
    `path` itself when it names a .json file.  Returns the tokenizer.json path."""
    path = Path(path)
    target = path if path.suffix == ".json" else path / "tokenizer.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    build_test_tokenizer(vocab_size).save(str(target))
    if target.name == "tokenizer.json":
        config = {"add_bos_token": False, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
                  "pad_token": EOS, "clean_up_tokenization_spaces": False,
                  "model_max_length": 1048576, "tokenizer_class": "PreTrainedTokenizerFast"}
        (target.parent / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return target

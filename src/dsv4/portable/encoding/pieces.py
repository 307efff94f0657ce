"""A prompt as a sequence of trusted control tokens and untrusted text (encoding spec §6.3).

The reference encoder produces one string and tokenizes it whole, so a user who types `<think>` or
`<｜User｜>` injects a control token.  We keep the distinction instead: the encoder appends structural
tokens with `control()` and everything a client sent with `text()`.  `str(prompt)` is still the exact
reference string, while `Tokenizer.encode_prompt` maps only the control pieces to special ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .tokens import CONTROL_TOKENS

_CONTROL_RE = re.compile("|".join(re.escape(t) for t in sorted(CONTROL_TOKENS, key=len, reverse=True)))


@dataclass(frozen=True)
class Control:
    """A structural token the encoder itself emits; tokenized as exactly one special id."""

    token: str


@dataclass
class Prompt:
    """Ordered pieces: `str` for plain text, `Control` for structural tokens."""

    pieces: list = field(default_factory=list)

    def text(self, s: str) -> None:
        """Append client-supplied (or template) text; it is never matched against special tokens."""
        if s:
            self.pieces.append(s)

    def control(self, token: str) -> None:
        if token not in CONTROL_TOKENS:
            raise ValueError(f"not a control token: {token!r}")
        self.pieces.append(Control(token))

    def template(self, s: str) -> None:
        """Append trusted template text, turning the control-token strings inside it into controls.

        Used for fixed markup (tools section, DSML tags) where the reference's whole-string
        tokenization yields special ids, e.g. the `<think>` inside the tools instructions.
        """
        pos = 0
        for m in _CONTROL_RE.finditer(s):
            self.text(s[pos:m.start()])
            self.control(m.group())
            pos = m.end()
        self.text(s[pos:])

    def runs(self):
        """Yield `Control` pieces and maximal runs of adjacent text joined into one string.

        Adjacent text must be tokenized together (e.g. `<tool_result>` + content) to reproduce the
        reference ids, which split only at special tokens.
        """
        buf = []
        for p in self.pieces:
            if isinstance(p, Control):
                if buf:
                    yield "".join(buf)
                    buf = []
                yield p
            else:
                buf.append(p)
        if buf:
            yield "".join(buf)

    def __str__(self) -> str:
        return "".join(p.token if isinstance(p, Control) else p for p in self.pieces)

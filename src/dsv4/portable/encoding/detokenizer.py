"""Incremental detokenization for streaming: text comes out only once its UTF-8 bytes are complete.

Byte-level BPE splits multi-byte characters across tokens (a CJK character or an emoji can take
two or three ids), so decoding token by token would emit U+FFFD garbage.  Bytes are accumulated and
fed through an incremental UTF-8 decoder; O(1) work per token regardless of how long the stream is.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Feed token ids one at a time (or in batches); get back the newly complete text."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def push_many(self, token_ids) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: any dangling partial character is emitted as U+FFFD."""
        return self._decoder.decode(b"", final=True)

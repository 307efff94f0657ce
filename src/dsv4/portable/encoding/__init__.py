"""DeepSeek V4 chat encoding: messages -> prompt -> ids, and completions -> messages.

The stable public API used by the CLI and the server (`dsv4.encoding` re-exports this package):

* `encode_messages(messages, ...) -> str`, `render_prompt(...) -> Prompt` – the encoder (`encoder`);
* `load_tokenizer(path=None) -> Tokenizer` with `encode_messages(...) -> ids`, `encode(text)`,
  `decode(ids)`, special ids; `IncrementalDetokenizer` for streaming (`tokenizer`, `detokenizer`);
* `parse_completion(text, thinking_mode) -> dict` (strict) and `StreamParser` (tolerant, incremental);
* `from_openai(request)` / `from_anthropic(request) -> EncoderInput` (`requests`);
* `build_test_tokenizer` / `write_test_tokenizer` for tiny checkpoints (`tiny_tokenizer`).
"""

from .detokenizer import IncrementalDetokenizer
from .encoder import effort_table_for, encode_messages, render_prompt
from .errors import EncodingError, ParseError, RequestError
from .parser import parse_completion
from .pieces import Control, Prompt
from .requests import EncoderInput, from_anthropic, from_openai, map_reasoning_effort
from .stream import ContentDelta, ReasoningDelta, StreamParser, ToolCallEvent
from .tiny_tokenizer import build_test_tokenizer, write_test_tokenizer
from .tokenizer import OFFICIAL_TOKENIZER_SHA256, Tokenizer, load_tokenizer, official_tokenizer_path

__all__ = [
    "encode_messages", "render_prompt", "effort_table_for", "Prompt", "Control",
    "Tokenizer", "load_tokenizer", "official_tokenizer_path", "OFFICIAL_TOKENIZER_SHA256",
    "IncrementalDetokenizer",
    "parse_completion", "StreamParser", "ReasoningDelta", "ContentDelta", "ToolCallEvent",
    "from_openai", "from_anthropic", "EncoderInput", "map_reasoning_effort",
    "build_test_tokenizer", "write_test_tokenizer",
    "EncodingError", "ParseError", "RequestError",
]

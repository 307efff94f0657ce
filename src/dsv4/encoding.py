"""`dsv4.encoding`: DeepSeek V4 chat encoding, the public name of `dsv4.portable.encoding`.

    from dsv4.encoding import encode_messages, parse_completion, load_tokenizer, StreamParser

Every name of `dsv4.portable.encoding.__all__` (its docstring lists them); docs/encoding-spec.md is the
format they implement.
"""

from .portable import encoding as _encoding
from .portable.encoding import *  # noqa: F403 (exactly _encoding.__all__)

__all__ = list(_encoding.__all__)

"""llama-server's tokenizer endpoints: `/tokenize` and `/detokenize`.

Shapes as llama-server has them: `{"content": str}` → `{"tokens": [int]}` and `{"tokens": [int]}` →
`{"content": str}`.  Text is tokenized as plain text (`Tokenizer.encode`), so a special-token string
such as `<｜end▁of▁sentence｜>` inside it stays text, as it would in a prompt; `add_special: true`
puts the BOS id in front, as a raw-text prompt of `/v1/completions` has it.  `with_pieces: true`
answers `{"id", "piece"}` objects, the piece a string when the token's bytes are UTF-8 on their own
and the list of byte values otherwise (a byte-level token may hold part of a character).  Detokenizing
keeps control tokens as text, which is what a prompt's ids are read back as.
"""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse

from .errors import bad_request
from .fields import Body


def _piece(tokenizer, token_id: int) -> dict:
    raw = tokenizer.token_bytes(token_id)
    try:
        piece = raw.decode("utf-8")
    except UnicodeDecodeError:
        piece = list(raw)
    return {"id": token_id, "piece": piece}


async def tokenize(state, request):
    body = await Body.read(request)
    text = body.get("content", "string", required=True)
    add_special = body.get("add_special", "boolean", default=False)
    with_pieces = body.get("with_pieces", "boolean", default=False)
    tok = state.tokenizer
    ids = ([tok.bos_id] if add_special else []) + await asyncio.to_thread(tok.encode, text)
    return JSONResponse({"tokens": [_piece(tok, i) for i in ids] if with_pieces else ids})


async def detokenize(state, request):
    body = await Body.read(request)
    ids = body.get("tokens", "array", required=True)
    vocab = state.tokenizer.vocab_size
    for k, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise bad_request(f"'tokens[{k}]' must be an integer token id", "tokens")
        if not 0 <= t < vocab:
            raise bad_request(f"'tokens[{k}]' is {t}, outside the vocabulary of {vocab} ids (0..{vocab - 1})",
                              "tokens")
    return JSONResponse({"content": await asyncio.to_thread(state.tokenizer.decode, ids)})


ROUTES = [("/tokenize", tokenize, ["POST"]),
          ("/detokenize", detokenize, ["POST"])]

"""Anthropic Messages endpoints: `/v1/messages` (stream and not) and `/v1/messages/count_tokens`.

Output blocks follow the order the model writes them: `thinking`, then `text`, then one `tool_use`
per parsed DSML invoke (its `input` is the parsed arguments object).  The stream is the official
sequence: message_start, per block content_block_start / *_delta / content_block_stop, message_delta
(stop_reason, output usage), message_stop.  Thinking blocks carry an empty signature: the server has
no signing key, and the encoder ignores signatures when the block comes back.  Usage follows the
Anthropic convention: `input_tokens` excludes the prompt tokens read from the prefix cache, which are
reported as `cache_read_input_tokens`.  A request without a `thinking` field gets no thinking, as
Anthropic's own API answers it.
"""

from __future__ import annotations

import json
import uuid

from fastapi.responses import JSONResponse

from dsv4.portable.encoding import ContentDelta, ReasoningDelta, ToolCallEvent, from_anthropic

from .errors import anthropic_error_body, bad_request
from .fields import Body, draft_tokens, sampling_params
from .generation import Done, GenParams, Generation, output_constraint
from .metrics import observe
from .sse import EventStream, sse

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}


def _stop_reason(done: Done) -> str:
    return "tool_use" if done.tool_calls and done.finish == "stop" else _STOP_REASONS[done.finish]


def _input_usage(prompt_tokens: int, cached: int) -> dict:
    return {"input_tokens": prompt_tokens - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0}


def _check_request(body: Body, state) -> None:
    state.check_model(body.get("model", "string", required=True))
    body.get("messages", "array", required=True)
    for name, kinds in (("system", ("string", "array")), ("tools", ("array",)), ("tool_choice", ("object",)),
                        ("thinking", ("object",)), ("metadata", ("object",))):
        body.get(name, *kinds)


async def _encode(body: Body, state) -> tuple:
    enc = from_anthropic(body.data, effort_table=state.effort_table, default_thinking=False)
    return enc, await state.encode(enc)


def _tool_use(ev: ToolCallEvent) -> dict:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": ev.name,
            "input": json.loads(ev.arguments)}


async def messages(state, request):
    body = await Body.read(request)
    _check_request(body, state)
    max_tokens = body.integer("max_tokens", None, 1)
    if max_tokens is None:
        raise bad_request("missing required parameter 'max_tokens'", "max_tokens")
    stream = body.get("stream", "boolean", default=False)
    sampling = sampling_params(body, max_temperature=1.0)
    stop = body.strings("stop_sequences", max_items=16)
    enc, prompt = await _encode(body, state)
    params = GenParams(state.budget(len(prompt), max_tokens, "max_tokens"), sampling, stop,
                       constraint=await output_constraint(state.engine, state.tokenizer, enc),
                       draft_tokens=draft_tokens(body, state.engine.model))
    gen = Generation(state.engine, state.tokenizer, prompt, params, enc.thinking_mode)
    head = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": state.model_name}
    if stream:
        return EventStream(_stream(gen, head), gen.cancel)
    blocks, done = [], None
    async for ev in observe(gen.events(request.is_disconnected)):
        if isinstance(ev, ReasoningDelta):
            if not blocks or blocks[-1]["type"] != "thinking":
                blocks.append({"type": "thinking", "thinking": "", "signature": ""})
            blocks[-1]["thinking"] += ev.text
        elif isinstance(ev, ContentDelta):
            if not blocks or blocks[-1]["type"] != "text":
                blocks.append({"type": "text", "text": ""})
            blocks[-1]["text"] += ev.text
        elif isinstance(ev, ToolCallEvent):
            blocks.append(_tool_use(ev))
        elif isinstance(ev, Done):
            done = ev
    if done.finish == "error":
        raise done.failure()
    usage = {**_input_usage(done.prompt_tokens, done.cached_tokens), "output_tokens": done.completion_tokens,
             **done.speculative()}
    return JSONResponse({**head, "content": blocks, "stop_reason": _stop_reason(done),
                         "stop_sequence": done.stop_sequence, "usage": usage})


def _message_start(head: dict, job) -> str:
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**_input_usage(len(job.prompt), job.cached_tokens), "output_tokens": 0}}
    return sse({"type": "message_start", "message": start}, "message_start")


async def _stream(gen, head):
    """The event stream of one message.  `message_start` goes out with the engine's first event: only
    then has the job looked the prefix cache up, and its usage must say what `message_delta` says."""
    started = False
    index, open_kind = -1, None

    def open_block(block):
        nonlocal index, open_kind
        frames = close_block()
        index, open_kind = index + 1, block["type"]
        return frames + [sse({"type": "content_block_start", "index": index, "content_block": block},
                             "content_block_start")]

    def close_block():
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [sse({"type": "content_block_stop", "index": index}, "content_block_stop")]

    def delta(payload):
        return sse({"type": "content_block_delta", "index": index, "delta": payload}, "content_block_delta")

    async for ev in observe(gen.events()):
        frames = [] if started else [_message_start(head, gen.job)]
        started = True
        if isinstance(ev, ReasoningDelta):
            if open_kind != "thinking":
                frames += open_block({"type": "thinking", "thinking": "", "signature": ""})
            frames.append(delta({"type": "thinking_delta", "thinking": ev.text}))
        elif isinstance(ev, ContentDelta):
            if open_kind != "text":
                frames += open_block({"type": "text", "text": ""})
            frames.append(delta({"type": "text_delta", "text": ev.text}))
        elif isinstance(ev, ToolCallEvent):
            block = _tool_use(ev)
            frames += open_block({**block, "input": {}})
            frames.append(delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])}))
            frames += close_block()
        elif isinstance(ev, Done):
            frames += close_block()
            if ev.finish == "error":
                frames.append(sse(anthropic_error_body(ev.failure()), "error"))
            else:
                frames.append(sse({"type": "message_delta",
                                   "delta": {"stop_reason": _stop_reason(ev), "stop_sequence": ev.stop_sequence},
                                   "usage": {**_input_usage(ev.prompt_tokens, ev.cached_tokens),
                                             "output_tokens": ev.completion_tokens, **ev.speculative()}},
                                  "message_delta"))
                frames.append(sse({"type": "message_stop"}, "message_stop"))
        for frame in frames:
            yield frame


async def count_tokens(state, request):
    """The prompt's token count, refused like `/v1/messages` refuses it when it does not fit the
    context (so a count is also the answer to "would this prompt be accepted")."""
    body = await Body.read(request)
    _check_request(body, state)
    _, prompt = await _encode(body, state)
    state.budget(len(prompt), None, "max_tokens")
    return JSONResponse({"input_tokens": len(prompt)})


ROUTES = [("/v1/messages", messages, ["POST"]),
          ("/v1/messages/count_tokens", count_tokens, ["POST"])]

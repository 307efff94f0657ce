"""OpenAI-compatible endpoints: chat completions, legacy completions, models.

Conventions beyond the OpenAI spec follow DeepSeek's own API: reasoning comes back as
`reasoning_content` (message and stream delta), thinking is switched with `thinking: {"type": ...}`,
`chat_template_kwargs.thinking` or `reasoning_effort` (see `encoding.requests`); a request that says
nothing gets the server's `--default-mode` (chat unless set), which the model object names as
`default_mode`.  A tool call
is streamed as one delta carrying its complete JSON arguments, once the parser has closed the DSML
invoke, so a client never sees markup or half-parsed arguments.  Logprobs cover every generated token
(reasoning included) under `logprobs.content`.  The final stream chunk (the one with `finish_reason`)
always carries `usage`; `stream_options.include_usage` adds OpenAI's separate usage-only chunk.
`n` > 1 choices share one prefill (the others start from forks of its state, `Generation.choices`);
usage counts the prompt once and sums the choices' completion tokens, and in a stream the finish chunk
of the last choice to end carries it.
"""

from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse

from dsv4.portable.encoding import ContentDelta, ReasoningDelta, ToolCallEvent

from .errors import bad_request, openai_error_body
from .fields import Body, draft_tokens, sampling_params
from .generation import (Done, GenParams, Generation, TokenInfo, gather, merge, output_constraint,
                         speculative_usage)
from .metrics import observe
from .sse import EventStream, sse

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16


def _usage(*dones: Done) -> dict:
    """Usage of a request's choices: their shared prompt once, their completion tokens summed."""
    prompt, completion = dones[0].prompt_tokens, sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": dones[0].cached_tokens},
            **speculative_usage(sum(d.drafted for d in dones), sum(d.accepted for d in dones))}


def _finish_reason(done: Done) -> str:
    if done.finish == "length":
        return "length"
    return "tool_calls" if done.tool_calls and done.finish == "stop" else "stop"


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def _logprob_entries(tokenizer, infos) -> list:
    return [{**_token_entry(tokenizer, t.id, t.logprob),
             "top_logprobs": [_token_entry(tokenizer, i, lp) for i, lp in t.top]} for t in infos]


def _top_logprobs(body: Body) -> int | None:
    """None when logprobs are off, else how many alternatives per token."""
    wanted = body.get("logprobs", "boolean", default=False)
    top = body.integer("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad_request("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _include_usage(body: Body, stream: bool) -> bool:
    options = body.get("stream_options", "object", default={})
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options")
    return include


def _check_common(body: Body, state) -> bool:
    """Fields every generation endpoint shares; returns `stream`."""
    state.check_model(body.get("model", "string", required=True))
    return body.get("stream", "boolean", default=False)


def _choices(body: Body) -> int:
    """`n`: choices of one prompt (one prefill, the others forks of its state)."""
    return body.integer("n", 1, 1, MAX_CHOICES)


def _max_tokens(body: Body, state, prompt_len: int, default: int | None) -> int:
    param = "max_completion_tokens" if body.data.get("max_completion_tokens") is not None else "max_tokens"
    return state.budget(prompt_len, body.integer(param, default, 1), param)


# ---------------------------------------------------------------- chat completions


async def chat_completions(state, request):
    body = await Body.read(request)
    stream = _check_common(body, state)
    body.get("messages", "array", required=True)
    for name, kinds in (("tools", ("array",)), ("tool_choice", ("string", "object")),
                        ("reasoning_effort", ("string",)), ("thinking", ("object",)),
                        ("chat_template_kwargs", ("object",)), ("response_format", ("object",)),
                        ("parallel_tool_calls", ("boolean",)), ("user", ("string",))):
        body.get(name, *kinds)
    enc = state.openai_input(body.data)
    top = _top_logprobs(body)
    params_sampling = sampling_params(body, max_temperature=2.0, vocab_size=state.tokenizer.vocab_size)
    stop = body.strings("stop", max_items=16)
    include_usage = _include_usage(body, stream)
    prompt = await state.encode(enc)
    params = GenParams(_max_tokens(body, state, len(prompt), None), params_sampling, stop, top, n=_choices(body),
                       constraint=await output_constraint(state.engine, state.tokenizer, enc),
                       draft_tokens=draft_tokens(body, state.engine.model))
    gens = Generation.choices(state.engine, state.tokenizer, prompt, params, enc.thinking_mode)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name,
            "system_fingerprint": None}
    thinking = enc.thinking_mode == "thinking"
    if stream:
        frames = _chat_stream(state, gens, head, top is not None, include_usage, thinking)
        return EventStream(frames, lambda: _cancel(gens))
    return JSONResponse(await _chat_result(state, gens, head, top is not None, thinking, request))


def _cancel(gens) -> None:
    for gen in gens:
        gen.cancel()


async def _chat_result(state, gens, head, logprobs, thinking, request) -> dict:
    answers = await gather(_chat_choice(state, gen, i, logprobs, thinking, request) for i, gen in enumerate(gens))
    return {**head, "object": "chat.completion", "choices": [choice for choice, _ in answers],
            "usage": _usage(*(done for _, done in answers))}


async def _chat_choice(state, gen, index, logprobs, thinking, request) -> tuple:
    """(choice object, Done) of one choice."""
    reasoning, content, calls, infos = [], [], [], []
    done = None
    async for ev in observe(gen.events(request.is_disconnected)):
        if isinstance(ev, TokenInfo):
            infos.append(ev)
        elif isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCallEvent):
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": ev.name, "arguments": ev.arguments}})
        else:
            done = ev
    if done.finish == "error":
        raise done.failure()
    message = {"role": "assistant", "content": "".join(content) if content or not calls else None}
    if thinking:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    choice = {"index": index, "message": message, "finish_reason": _finish_reason(done),
              "logprobs": {"content": _logprob_entries(state.tokenizer, infos), "refusal": None}
              if logprobs else None}
    return choice, done


async def _chat_stream(state, gens, head, logprobs, include_usage, thinking):
    """Chunks of every choice as they come; the last choice's finish chunk carries the request's usage."""
    infos, dones = [[] for _ in gens], []

    def chunk(index, delta, finish=None, **extra):
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        if logprobs and infos[index]:
            choice["logprobs"] = {"content": _logprob_entries(state.tokenizer, infos[index]), "refusal": None}
            infos[index].clear()
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    for index in range(len(gens)):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for index, ev in merge([observe(gen.events()) for gen in gens]):
        if isinstance(ev, TokenInfo):
            infos[index].append(ev)
        elif isinstance(ev, ReasoningDelta):
            yield chunk(index, {"reasoning_content": ev.text})
        elif isinstance(ev, ContentDelta):
            yield chunk(index, {"content": ev.text})
        elif isinstance(ev, ToolCallEvent):
            yield chunk(index, {"tool_calls": [{"index": ev.index, "id": f"call_{uuid.uuid4().hex[:24]}",
                                                "type": "function",
                                                "function": {"name": ev.name, "arguments": ev.arguments}}]})
        elif ev.finish == "error":
            dones.append(ev)
            yield sse(openai_error_body(ev.failure()))
        else:
            dones.append(ev)
            if len(dones) < len(gens):
                yield chunk(index, {}, _finish_reason(ev))
                continue
            yield chunk(index, {}, _finish_reason(ev), usage=_usage(*dones))
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(*dones)})
    yield sse("[DONE]")


# ---------------------------------------------------------------- legacy completions


async def _completion_prompt(body: Body, state) -> list:
    """A string (tokenized after BOS, as raw text) or a list of token ids; batches of one are unwrapped."""
    prompt = body.get("prompt", "string", "array", required=True)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await state.encode_text(prompt)
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise bad_request("'prompt' must be a string, or one non-empty list of token ids; batched prompts "
                          "are not supported", "prompt")
    vocab = state.tokenizer.vocab_size          # never above the model's (checked at load)
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"'prompt' holds token id {bad}, outside the vocabulary of {vocab} ids "
                          f"(0..{vocab - 1})", "prompt")
    return list(prompt)


async def completions(state, request):
    body = await Body.read(request)
    stream = _check_common(body, state)
    body.unsupported_unless("echo", (False,))
    body.unsupported_unless("suffix", ("",))
    body.integer("best_of", 1, 1, 1)
    top = body.integer("logprobs", None, 0, 5)
    params_sampling = sampling_params(body, max_temperature=2.0, vocab_size=state.tokenizer.vocab_size)
    stop = body.strings("stop", max_items=16)
    include_usage = _include_usage(body, stream)
    prompt = await _completion_prompt(body, state)
    params = GenParams(_max_tokens(body, state, len(prompt), 16), params_sampling, stop, top, n=_choices(body),
                       draft_tokens=draft_tokens(body, state.engine.model))
    gens = Generation.choices(state.engine, state.tokenizer, prompt, params, "raw")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    if stream:
        return EventStream(_completion_stream(state, gens, head, top is not None, include_usage),
                           lambda: _cancel(gens))
    answers = await gather(_completion_choice(state, gen, i, top is not None, request)
                           for i, gen in enumerate(gens))
    return JSONResponse({**head, "choices": [choice for choice, _ in answers],
                         "usage": _usage(*(done for _, done in answers))})


async def _completion_choice(state, gen, index, logprobs, request) -> tuple:
    """(choice object, Done) of one choice."""
    text, infos, done = [], [], None
    async for ev in observe(gen.events(request.is_disconnected)):
        if isinstance(ev, TokenInfo):
            infos.append(ev)
        elif isinstance(ev, ContentDelta):
            text.append(ev.text)
        elif isinstance(ev, Done):
            done = ev
    if done.finish == "error":
        raise done.failure()
    choice = {"index": index, "text": "".join(text), "finish_reason": _finish_reason(done),
              "logprobs": _legacy_logprobs(state.tokenizer, infos) if logprobs else None}
    return choice, done


def _legacy_logprobs(tokenizer, infos, offset: int = 0) -> dict:
    tokens = [tokenizer.token_bytes(t.id).decode("utf-8", errors="replace") for t in infos]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in infos], "text_offset": offsets,
            "top_logprobs": [{tokenizer.token_bytes(i).decode("utf-8", errors="replace"): lp for i, lp in t.top}
                             for t in infos]}


async def _completion_stream(state, gens, head, logprobs, include_usage):
    """Chunks of every choice as they come; the last choice's finish chunk carries the request's usage."""
    infos, offsets, dones = [[] for _ in gens], [0] * len(gens), []

    def chunk(index, text, finish=None, **extra):
        lp = None
        if logprobs and infos[index]:
            lp = _legacy_logprobs(state.tokenizer, infos[index], offsets[index])
            offsets[index] += sum(len(t) for t in lp["tokens"])
            infos[index].clear()
        return sse({**head, "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": lp}],
                    **extra})

    async for index, ev in merge([observe(gen.events()) for gen in gens]):
        if isinstance(ev, TokenInfo):
            infos[index].append(ev)
        elif isinstance(ev, ContentDelta):
            yield chunk(index, ev.text)
        elif ev.finish == "error":
            dones.append(ev)
            yield sse(openai_error_body(ev.failure()))
        else:
            dones.append(ev)
            if len(dones) < len(gens):
                yield chunk(index, "", _finish_reason(ev))
                continue
            yield chunk(index, "", _finish_reason(ev), usage=_usage(*dones))
            if include_usage:
                yield sse({**head, "choices": [], "usage": _usage(*dones)})
    yield sse("[DONE]")


# ---------------------------------------------------------------- models


def _model_object(state) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsv4",
            "context_length": state.context, "default_mode": state.default_mode}


async def models(state, request):
    return JSONResponse({"object": "list", "data": [_model_object(state)]})


async def model(state, request):
    state.check_model(request.path_params["model_id"])
    return JSONResponse(_model_object(state))


ROUTES = [("/v1/chat/completions", chat_completions, ["POST"]),
          ("/v1/completions", completions, ["POST"]),
          ("/v1/models", models, ["GET"]),
          ("/v1/models/{model_id:path}", model, ["GET"])]

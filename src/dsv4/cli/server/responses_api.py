"""The OpenAI Responses API: `POST /v1/responses` (stream and not), the OpenAI Agents SDK's default.

A request is translated into the Chat Completions body it is equivalent to and handed to the chat
adapter's own conversion (`from_openai`), so both APIs render the same conversation the same way:
`instructions` → a system message; input messages (user/system/developer/assistant, text parts) →
chat messages; an assistant turn's `reasoning`, `message` and `function_call` items → one assistant
message with `reasoning_content`, `content` and `tool_calls`; `function_call_output` → a tool
message; `reasoning.effort` → `reasoning_effort` ("none" is chat mode); `text.format` →
`response_format`.  Nothing is stored: `previous_response_id` and `conversation` are refused, and the
client sends the whole conversation each time (what the Agents SDK does by default).

Output items follow the order the model writes them: a `reasoning` item (its text in `content` as
`reasoning_text`; `summary` stays empty, there is no summarizer), a `message` with one `output_text`
part, and one `function_call` item per parsed DSML invoke, whose complete JSON
arguments arrive in one delta once the invoke has closed (as in the chat adapter).  Streaming and
non-streaming responses are built by the same `_Builder` from the same `Generation` events; a stream
sends every change as the typed event the openai client defines, numbered by `sequence_number`.

`output_tokens_details.reasoning_tokens` counts the tokens generated before the first answer text or
tool call (the `</think>` token included); it is exact unless a tokenizer holds text back across that
boundary.  A forced tool call (`tool_choice` "required" or a named function) and a JSON `text.format`
are held to by the grammar constraint the chat adapter's request mapping asks for
(`portable.constraints`).
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import uuid

from fastapi.responses import JSONResponse

from dsv4.portable.encoding import ContentDelta, ReasoningDelta, RequestError, ToolCallEvent, map_reasoning_effort

from .errors import bad_request
from .fields import Body, draft_tokens, sampling_params
from .generation import Done, GenParams, Generation, TokenInfo, output_constraint
from .metrics import observe
from .sse import EventStream, sse

_TEXT_PARTS = ("input_text", "output_text")
_ASSISTANT_STAGES = ("reasoning_content", "content", "tool_calls")   # the order within one assistant turn


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- request → chat completions body


def _string(value, where: str, param: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"'{where}' must be a string", param)
    return value


def _text(content, where: str) -> str | list:
    """Message content as the chat adapter takes it: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or a list of content parts", "input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise bad_request(f"'{where}[{j}]': content part of type {_json(kind)} is not supported (DeepSeek "
                              f"V4 is a text model; use {' or '.join(_TEXT_PARTS)})", "input")
        parts.append({"type": "text", "text": _string(part.get("text"), f"{where}[{j}].text", "input")})
    return parts


def _assistant(messages: list, stage: str) -> dict:
    """The assistant message an item of `stage` belongs to: the last one, unless it already holds this
    stage or a later one (then the item starts a new assistant turn).  Tool calls accumulate."""
    last = messages[-1] if messages else None
    taken = _ASSISTANT_STAGES[_ASSISTANT_STAGES.index(stage):] if stage != "tool_calls" else ()
    if last is None or last["role"] != "assistant" or any(last.get(k) for k in taken):
        last = {"role": "assistant", "content": ""}
        messages.append(last)
    return last


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text: its `content` (reasoning_text parts), else its `summary`."""
    for key in ("content", "summary"):
        parts = item.get(key) or []
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise bad_request(f"'{where}.{key}' must be a list of parts", "input")
        if parts:
            return "\n\n".join(_string(p.get("text"), f"{where}.{key}[{j}].text", "input")
                               for j, p in enumerate(parts))
    return ""


def _add_item(messages: list, item, where: str) -> None:
    if not isinstance(item, dict):
        raise bad_request(f"'{where}' must be an object", "input")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role in ("user", "system", "developer"):
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif role == "assistant":
            _assistant(messages, "content")["content"] = _text(item.get("content"), f"{where}.content")
        else:
            raise bad_request(f"'{where}.role' must be user, system, developer or assistant, got "
                              f"{_json(role)}", "input")
    elif kind == "reasoning":
        _assistant(messages, "reasoning_content")["reasoning_content"] = _reasoning_text(item, where)
    elif kind == "function_call":
        call = {"id": _string(item.get("call_id"), f"{where}.call_id", "input"), "type": "function",
                "function": {"name": _string(item.get("name"), f"{where}.name", "input"),
                             "arguments": _string(item.get("arguments", "{}"), f"{where}.arguments", "input")}}
        _assistant(messages, "tool_calls").setdefault("tool_calls", []).append(call)
    elif kind == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": _string(item.get("call_id"), f"{where}.call_id", "input"),
                         "content": _text(item.get("output"), f"{where}.output")})
    elif kind == "item_reference":
        raise bad_request(f"'{where}': item references need stored responses, which this server does not "
                          "keep; send the items themselves", "input")
    else:
        raise bad_request(f"'{where}': input items of type {_json(kind)} are not supported (use message, "
                          "reasoning, function_call or function_call_output)", "input")


def _messages(body: Body) -> list:
    messages = []
    instructions = body.get("instructions", "string")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input", "string", "array", required=True)
    if not raw:
        raise bad_request("'input' must be a non-empty string or list of items", "input")
    for k, item in enumerate([{"role": "user", "content": raw}] if isinstance(raw, str) else raw):
        _add_item(messages, item, f"input[{k}]")
    return messages


def _tools(tools: list) -> list:
    """Responses function tools (flat) → chat tools ({"function": {...}})."""
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"'tools[{i}]': only function tools are supported, got type {_json(kind)}", "tools")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"'tools[{i}].name' must be a non-empty string", "tools")
        for key, kind, types in (("description", "a string", str), ("parameters", "an object", dict),
                                 ("strict", "a boolean", bool)):
            if tool.get(key) is not None and not isinstance(tool[key], types):
                raise bad_request(f"'tools[{i}].{key}' must be {kind}", "tools")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                           "strict") if tool.get(k) is not None}})
    return out


def _tool_choice(choice):
    """Responses `tool_choice` → the chat adapter's (a named function is flat here, nested there)."""
    if choice in (None, "auto", "none", "required"):
        return choice or "auto"
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function",
                "function": {"name": _string(choice.get("name"), "tool_choice.name", "tool_choice")}}
    raise bad_request(f"unsupported tool_choice {_json(choice)}; use 'auto', 'none', 'required' or "
                      "{'type': 'function', 'name': ...}", "tool_choice")


def _response_format(text: dict) -> dict | None:
    """`text.format` → the chat adapter's `response_format`."""
    if text.get("verbosity") not in (None, "medium"):
        raise bad_request(f"'text.verbosity'={_json(text['verbosity'])} is not supported by this server", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("'text.format.schema' must be an object (the JSON schema)", "text")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict")
                                                       if fmt.get(k) is not None}}
    raise bad_request(f"'text.format.type' must be text, json_object or json_schema, got {_json(kind)}", "text")


def _effort(body: Body, effort_table: str) -> str | None:
    """`reasoning.effort`, checked against the names the chat adapter maps onto the effort table."""
    effort = body.get("reasoning", "object", default={}).get("effort")
    if effort is not None and not isinstance(effort, str):
        raise bad_request("'reasoning.effort' must be a string", "reasoning")
    try:
        map_reasoning_effort(None if effort == "none" else effort, effort_table)
    except RequestError as e:
        raise bad_request(f"'reasoning.effort': {e}", "reasoning") from None
    return effort


def _refuse_state(body: Body) -> None:
    """Fields that need responses stored or run in the background, which this server never does."""
    for name in ("previous_response_id", "conversation"):
        if body.data.get(name) is not None:
            raise bad_request(f"'{name}' needs stored responses, which this server does not keep; send the "
                              "whole conversation in 'input'", name)
    body.unsupported_unless("background", (False,))
    body.unsupported_unless("truncation", ("disabled",))
    body.unsupported_unless("top_logprobs", (0,))
    include = body.get("include", "array", default=[])
    if "message.output_text.logprobs" in include:
        raise bad_request("'include': message.output_text.logprobs is not supported on /v1/responses (use "
                          "/v1/chat/completions with logprobs)", "include")


def chat_body(body: Body, effort_table: str) -> dict:
    """The Chat Completions body equivalent to this Responses request (module docstring)."""
    for name, kinds in (("store", ("boolean",)), ("parallel_tool_calls", ("boolean",)), ("user", ("string",)),
                        ("metadata", ("object",)), ("text", ("object",)), ("tools", ("array",)),
                        ("tool_choice", ("string", "object"))):
        body.get(name, *kinds)
    _refuse_state(body)
    chat = {"messages": _messages(body), "tools": _tools(body.get("tools", "array", default=[])) or None,
            "tool_choice": _tool_choice(body.data.get("tool_choice")),
            "response_format": _response_format(body.get("text", "object", default={})),
            "parallel_tool_calls": body.data.get("parallel_tool_calls")}
    effort = _effort(body, effort_table)
    if effort is not None:
        chat["reasoning_effort"] = effort
    return chat


# ---------------------------------------------------------------- output items and stream events


class _Builder:
    """The response object, grown from `Generation` events; `feed` returns the stream events that
    describe each change (without `sequence_number`, which the stream adds)."""

    def __init__(self, skeleton: dict, thinking: bool):
        self.skeleton, self.thinking = skeleton, thinking
        self.output: list = []
        self.done: Done | None = None
        self._open = None                 # the item being written, until the next one starts
        self._tokens = 0
        self._reasoning_tokens = None     # set when the first answer text or tool call arrives

    def response(self, status: str = "in_progress") -> dict:
        return {**self.skeleton, "status": status, "output": copy.deepcopy(self.output)}

    def feed(self, ev) -> list:
        if isinstance(ev, TokenInfo):
            self._tokens += 1
            return []
        if isinstance(ev, ReasoningDelta):
            return self._delta("reasoning", "response.reasoning_text.delta", ev.text)
        if isinstance(ev, ContentDelta):
            return self._delta("message", "response.output_text.delta", ev.text, logprobs=[])
        if isinstance(ev, ToolCallEvent):
            return self._tool_call(ev)
        return self._finish(ev)

    def _answer_started(self) -> None:
        if self._reasoning_tokens is None:
            self._reasoning_tokens = max(self._tokens - 1, 0) if self.thinking else 0

    def _delta(self, kind: str, event: str, text: str, **extra) -> list:
        events = []
        if self._open is None or self._open["type"] != kind:
            events = self._open_item(kind)
        if kind == "message":
            self._answer_started()
        part = self._open["content"][0]
        part["text"] += text
        return events + [{"type": event, **self._where(), "content_index": 0, "delta": text, **extra}]

    def _open_item(self, kind: str) -> list:
        events = self._close()
        if kind == "reasoning":
            item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output.append(item)
        self._open = item
        events.append({"type": "response.output_item.added", "output_index": len(self.output) - 1,
                       "item": copy.deepcopy(item)})
        item["content"].append(part)
        return events + [{"type": "response.content_part.added", **self._where(), "content_index": 0,
                          "part": dict(part)}]

    def _tool_call(self, ev: ToolCallEvent) -> list:
        self._answer_started()
        events = self._close()
        item = {"id": _new_id("fc"), "type": "function_call", "call_id": _new_id("call"), "name": ev.name,
                "arguments": "", "status": "in_progress"}
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        events.append({"type": "response.output_item.added", "output_index": where["output_index"],
                       "item": dict(item)})
        item.update(arguments=ev.arguments, status="completed")
        return events + [{"type": "response.function_call_arguments.delta", **where, "delta": ev.arguments},
                         {"type": "response.function_call_arguments.done", **where, "name": ev.name,
                          "arguments": ev.arguments},
                         {"type": "response.output_item.done", "output_index": where["output_index"],
                          "item": dict(item)}]

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self.output) - 1}

    def _close(self, status: str = "completed") -> list:
        item, self._open = self._open, None
        if item is None:
            return []
        part = item["content"][0]
        item["status"] = status
        where = {"item_id": item["id"], "output_index": self.output.index(item)}
        text_done = ({"type": "response.reasoning_text.done", **where, "content_index": 0, "text": part["text"]}
                     if item["type"] == "reasoning" else
                     {"type": "response.output_text.done", **where, "content_index": 0, "text": part["text"],
                      "logprobs": []})
        return [text_done,
                {"type": "response.content_part.done", **where, "content_index": 0, "part": dict(part)},
                {"type": "response.output_item.done", "output_index": where["output_index"],
                 "item": copy.deepcopy(item)}]

    def _finish(self, done: Done) -> list:
        self.done = done
        if done.finish == "error":
            failed = {**self.response("failed"),
                      "error": {"code": "server_error", "message": done.failure().message}}
            return self._close("incomplete") + [{"type": "response.failed", "response": failed}]
        cut = done.finish == "length"
        events = self._close("incomplete" if cut else "completed")
        final = self.final()
        return events + [{"type": "response.incomplete" if cut else "response.completed", "response": final}]

    def final(self) -> dict:
        """The finished response: status, incomplete_details and usage from `done`."""
        done = self.done
        cut = done.finish == "length"
        reasoning = self._reasoning_tokens if self._reasoning_tokens is not None else \
            (done.completion_tokens if self.thinking else 0)
        usage = {"input_tokens": done.prompt_tokens,
                 "input_tokens_details": {"cached_tokens": done.cached_tokens},
                 "output_tokens": done.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": reasoning},
                 "total_tokens": done.prompt_tokens + done.completion_tokens, **done.speculative()}
        return {**self.response("incomplete" if cut else "completed"), "usage": usage,
                "incomplete_details": {"reason": "max_output_tokens"} if cut else None}


async def _stream(gen: Generation, builder: _Builder):
    seq = itertools.count()

    def frame(event: dict) -> str:
        return sse({**event, "sequence_number": next(seq)}, event["type"])

    yield frame({"type": "response.created", "response": builder.response()})
    yield frame({"type": "response.in_progress", "response": builder.response()})
    async for ev in observe(gen.events()):
        for event in builder.feed(ev):
            yield frame(event)


# ---------------------------------------------------------------- the route


def _skeleton(body: Body, model_name: str, chat: dict, sampling, max_output: int | None) -> dict:
    """The response object before any output: the request's settings echoed as OpenAI echoes them."""
    return {"id": _new_id("resp"), "object": "response", "created_at": int(time.time()), "status": None,
            "error": None, "incomplete_details": None, "instructions": body.data.get("instructions"),
            "max_output_tokens": max_output, "model": model_name, "output": [],
            "parallel_tool_calls": body.data.get("parallel_tool_calls", True), "previous_response_id": None,
            "reasoning": {"effort": chat.get("reasoning_effort"), "summary": None}, "store": False,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "text": {"format": body.get("text", "object", default={}).get("format") or {"type": "text"}},
            "tool_choice": body.data.get("tool_choice") or "auto", "tools": body.data.get("tools") or [],
            "truncation": "disabled", "usage": None, "user": body.data.get("user"),
            "metadata": body.data.get("metadata") or {}}


async def responses(state, request):
    body = await Body.read(request)
    state.check_model(body.get("model", "string", required=True))
    stream = body.get("stream", "boolean", default=False)
    chat = chat_body(body, state.effort_table)
    enc = state.openai_input(chat)
    sampling = sampling_params(body, max_temperature=2.0)
    max_output = body.integer("max_output_tokens", None, 1)
    prompt = await state.encode(enc)
    params = GenParams(state.budget(len(prompt), max_output, "max_output_tokens"), sampling,
                       constraint=await output_constraint(state.engine, state.tokenizer, enc),
                       draft_tokens=draft_tokens(body, state.engine.model))
    gen = Generation(state.engine, state.tokenizer, prompt, params, enc.thinking_mode)
    skeleton = _skeleton(body, state.model_name, chat, sampling, max_output)
    builder = _Builder(skeleton, enc.thinking_mode == "thinking")
    if stream:
        return EventStream(_stream(gen, builder), gen.cancel)
    async for ev in observe(gen.events(request.is_disconnected)):
        builder.feed(ev)
    if builder.done.finish == "error":
        raise builder.done.failure()
    return JSONResponse(builder.final())


ROUTES = [("/v1/responses", responses, ["POST"])]

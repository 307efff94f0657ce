"""OpenAI Chat Completions / Anthropic Messages requests -> encoder input (encoding spec §4).

These are API-boundary conventions, not part of DeepSeek's reference; the decisions:

* Thinking follows the request; one that says nothing gets the caller's default (`default_thinking`,
  and on the OpenAI side `default_effort`: the server's `--default-mode`).  OpenAI side:
  `thinking: {"type": "enabled"|"disabled"}`, else `chat_template_kwargs.thinking` /
  `.enable_thinking`; `reasoning_effort: "none"` means chat mode and any other effort means thinking
  unless a switch turns it off.  Anthropic side: the `thinking` object (`enabled`/`adaptive` vs
  `disabled`).
* `reasoning_effort` names are mapped onto the checkpoint's effort table, not passed through: on 2604
  minimal/low/medium/high -> "high" (a no-op there), xhigh/max -> "max"; on 0731 minimal/low/medium ->
  "low", high/xhigh -> "high", max -> "max".
* OpenAI `developer` is a system prompt (V4's own `developer` role is a search-agent user turn).
* Content-part lists: text parts joined by a blank line (like the encoder's block joining); any
  non-text part (images, audio, files) is refused – V4 is a text model.
* `tool_choice`: "auto"/absent keeps the tools, "none" omits them.  The prompt format has no way to
  force a call, so "required" / a named tool (OpenAI) and `any` / `{"type": "tool"}` (Anthropic) keep the
  tools in the prompt and set `EncoderInput.output`, an `OutputRule` the server turns into a grammar
  constraint (`dsv4.portable.constraints`); `parallel_tool_calls: false` / `disable_parallel_tool_use`
  allow one call only.
* `response_format`: json_schema -> its schema, json_object -> `{"type": "object"}`, rendered in the
  system prompt's response-format section and set as the `OutputRule` the content must satisfy (the
  offered tools, under "auto", remain the alternative).
* OpenAI `prefix: true` on the final assistant message and an Anthropic final assistant message
  (prefill) both become `wo_eos`: the model continues that text.
* Every field read has its JSON type checked (text is a string, an id is a string, a schema is an
  object...), so a malformed request is a `RequestError` naming the field, never a crash further on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .encoder import flatten_content
from .errors import RequestError

EFFORT_ALIASES = {
    "2604": {"minimal": "high", "low": "high", "medium": "high", "high": "high", "xhigh": "max",
             "max": "max"},
    "0731": {"minimal": "low", "low": "low", "medium": "low", "high": "high", "xhigh": "high",
             "max": "max"},
}


@dataclass(frozen=True)
class OutputRule:
    """What a reply must be when the request says so (the encoder cannot express it): with `forced`, a
    tool call to one of `tools` (OpenAI function objects), more than one only if `parallel`; otherwise
    JSON content valid under `schema`, or a call to one of `tools` (those offered under "auto")."""

    tools: list | None = None
    forced: bool = False
    parallel: bool = True
    schema: dict | None = None


@dataclass
class EncoderInput:
    """Keyword arguments for `encode_messages` / `Tokenizer.encode_messages` (`**as_kwargs()`), and the
    `output` rule the generation must follow (not the encoder's business)."""

    messages: list
    thinking_mode: str = "thinking"
    reasoning_effort: str | None = None
    drop_thinking: bool = True
    tools: list | None = None
    effort_table: str = "2604"
    output: OutputRule | None = field(default=None, compare=False)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "output"}


def _kind(value) -> str:
    """The JSON type of a decoded value, for messages."""
    for types, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"),
                        (dict, "object")):
        if isinstance(value, types):
            return name
    return "null" if value is None else type(value).__name__


def _string(value, where: str, default: str | None = "") -> str | None:
    """`value` when it is a string, `default` when it is absent (None); otherwise a RequestError."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {_kind(value)}")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be an object, got {_kind(value)}")
    return value


def map_reasoning_effort(effort, effort_table: str = "2604"):
    """An API effort name -> a value of the checkpoint's effort table (None stays None)."""
    if effort is None:
        return None
    aliases = EFFORT_ALIASES.get(effort_table.removeprefix("dsv4-"))
    if aliases is None:
        raise RequestError(f"unknown effort table {effort_table!r}")
    if effort not in aliases:
        raise RequestError(f"reasoning_effort {effort!r} is not supported "
                           f"(use one of {', '.join(aliases)} or 'none')")
    return aliases[effort]


# ---------------------------------------------------------------- OpenAI


def from_openai(request: dict, effort_table: str = "2604", default_thinking: bool = True,
                default_effort: str | None = None) -> EncoderInput:
    """Map an OpenAI/DeepSeek chat-completions request body to encoder input; a request with neither a
    thinking switch nor `reasoning_effort` thinks when `default_thinking`, at `default_effort`."""
    raw = request.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list")
    kwargs = _object(request.get("chat_template_kwargs") or {}, "chat_template_kwargs")
    thinking = _openai_thinking(request, kwargs)
    effort = request.get("reasoning_effort")
    if effort == "none":
        thinking, effort = False, None
    elif thinking is None and effort is None:
        thinking, effort = default_thinking, default_effort if default_thinking else None
    elif thinking is None:
        thinking = True
    messages = [_openai_message(m, f"messages[{k}]", is_last=k == len(raw) - 1) for k, m in enumerate(raw)]
    schema = _attach_response_format(messages, request.get("response_format"))
    tools = _openai_tools(request.get("tools"))
    choice = _openai_choice(request.get("tool_choice"))
    parallel = request.get("parallel_tool_calls") is not False
    return EncoderInput(messages=messages, thinking_mode="thinking" if thinking else "chat",
                        reasoning_effort=map_reasoning_effort(effort, effort_table),
                        drop_thinking=bool(kwargs.get("drop_thinking", True)),
                        tools=None if choice == "none" else tools, effort_table=effort_table,
                        output=_output_rule(tools, choice, parallel, schema))


def _openai_choice(choice):
    """OpenAI `tool_choice` as "auto", "none", "any" or ("tool", name)."""
    if choice in (None, "auto", "none"):
        return choice or "auto"
    if choice == "required":
        return "any"
    if isinstance(choice, dict) and choice.get("type") in ("auto", "none"):
        return choice["type"]
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
        if isinstance(name, str) and name:
            return "tool", name
    raise RequestError("tool_choice must be 'auto', 'none', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}", "tool_choice")


def _output_rule(tools, choice, parallel: bool, schema) -> OutputRule | None:
    """The rule a forced `choice` ("any" or ("tool", name)) or a response `schema` puts on the reply."""
    functions = [t["function"] for t in tools or ()]
    if choice in ("auto", "none"):
        if schema is None:
            return None
        return OutputRule(tools=functions if choice == "auto" and functions else None, schema=schema)
    if not functions:
        raise RequestError("tool_choice forces a tool call, but the request offers no tools", "tool_choice")
    if choice != "any":
        functions = [f for f in functions if f["name"] == choice[1]]
        if not functions:
            raise RequestError(f"tool_choice names the tool {choice[1]!r}, which is not among the tools",
                               "tool_choice")
    return OutputRule(tools=functions, forced=True, parallel=parallel)


def _openai_thinking(request, kwargs):
    """The request's thinking switch: True, False, or None when it has none."""
    switch = request.get("thinking")
    if isinstance(switch, dict) and "type" in switch:
        if switch["type"] not in ("enabled", "disabled"):
            raise RequestError(f"thinking.type must be 'enabled' or 'disabled', got {switch['type']!r}")
        return switch["type"] == "enabled"
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            return bool(kwargs[key])
    return None


def _openai_message(m, where, is_last):
    if not isinstance(m, dict):
        raise RequestError(f"{where}: each message must be an object")
    role = m.get("role")
    if role in ("system", "developer"):
        return {"role": "system", "content": _text_only(m.get("content"), f"{where}.content")}
    if role == "user":
        return {"role": "user", "content": _text_only(m.get("content"), f"{where}.content")}
    if role == "tool":
        return {"role": "tool", "tool_call_id": _string(m.get("tool_call_id"), f"{where}.tool_call_id"),
                "content": _text_only(m.get("content"), f"{where}.content")}
    if role == "assistant":
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        out = {"role": "assistant", "content": _text_only(m.get("content"), f"{where}.content"),
               "reasoning_content": _text_only(reasoning, f"{where}.reasoning_content")}
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be an array, got {_kind(calls)}")
            out["tool_calls"] = [_openai_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
        if m.get("prefix"):
            if not is_last:
                raise RequestError("prefix: true is only allowed on the last message")
            out["wo_eos"] = True
        return out
    raise RequestError(f"unsupported message role {role!r}")


def _openai_tool_call(call, where):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where}: each tool call needs function.name")
    return {"id": _string(call.get("id"), f"{where}.id", default=None), "type": "function",
            "function": {"name": function["name"], "arguments": function.get("arguments")}}


def _openai_tools(tools):
    if not tools:
        return None
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise RequestError("only function tools are supported: {'type': 'function', 'function': {...}}")
        _check_tool(tool["function"], f"tools[{i}].function", "parameters")
    return [{"type": "function", "function": tool["function"]} for tool in tools]


def _check_tool(function: dict, where: str, schema_key: str) -> None:
    """A tool definition's name (a non-empty string), description (a string) and schema (an object)."""
    if not _string(function.get("name"), f"{where}.name"):
        raise RequestError(f"{where}.name must be a non-empty string")
    _string(function.get("description"), f"{where}.description")
    if function.get(schema_key) is not None:
        _object(function[schema_key], f"{where}.{schema_key}")


def _attach_response_format(messages, response_format) -> dict | None:
    """Render the requested schema into the system prompt; returns it (None for plain text)."""
    if response_format is None:
        return None
    kind = _string(_object(response_format, "response_format").get("type"), "response_format.type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = _object(response_format.get("json_schema"), "response_format.json_schema")
        if spec.get("schema") is None:
            raise RequestError("response_format json_schema needs json_schema.schema")
        schema = _object(spec["schema"], "response_format.json_schema.schema")
    else:
        raise RequestError(f"unsupported response_format type {kind!r}")
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": ""})
    messages[0]["response_format"] = schema
    return schema


def _text_only(content, where):
    """Content as a string; a part list may hold only strings and text parts with string `text`."""
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text":
                _string(part.get("text"), f"{where}[{j}].text")
            elif not isinstance(part, str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise RequestError(f"{where}[{j}]: content part of type {kind!r} is not supported "
                                   "(DeepSeek V4 is a text model)")
    elif content is not None and not isinstance(content, str):
        raise RequestError(f"{where} must be a string or a list of parts, got {_kind(content)}")
    return flatten_content(content)


# ---------------------------------------------------------------- Anthropic


def from_anthropic(request: dict, effort_table: str = "2604", default_thinking: bool = True) -> EncoderInput:
    """Map an Anthropic Messages request body to encoder input."""
    raw = request.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list")
    messages = []
    if request.get("system"):
        messages.append({"role": "system", "content": _text_only(request["system"], "system")})
    for k, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "user":
            messages.extend(_anthropic_user(m.get("content"), f"messages[{k}].content"))
        elif role == "assistant":
            messages.append(_anthropic_assistant(m.get("content"), f"messages[{k}].content",
                                                 prefill=k == len(raw) - 1))
        else:
            raise RequestError(f"unsupported message role {role!r}")
    tools = _anthropic_tools(request.get("tools"))
    choice, parallel = _anthropic_choice(request.get("tool_choice"))
    return EncoderInput(messages=messages, thinking_mode="thinking" if _anthropic_thinking(
        request.get("thinking"), default_thinking) else "chat", tools=None if choice == "none" else tools,
        effort_table=effort_table, output=_output_rule(tools, choice, parallel, None))


def _anthropic_choice(choice) -> tuple:
    """Anthropic `tool_choice` as ("auto" | "none" | "any" | ("tool", name), parallel calls allowed)."""
    if choice is None:
        return "auto", True
    kind = _object(choice, "tool_choice").get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind in ("auto", "none", "any"):
        return kind, parallel
    if kind == "tool" and isinstance(choice.get("name"), str) and choice["name"]:
        return ("tool", choice["name"]), parallel
    raise RequestError("tool_choice.type must be 'auto', 'any', 'none', or 'tool' with a name", "tool_choice")


def _anthropic_thinking(switch, default):
    if not isinstance(switch, dict):
        return default
    if switch.get("type") not in ("enabled", "adaptive", "disabled"):
        raise RequestError(f"unsupported thinking type {switch.get('type')!r}")
    return switch["type"] != "disabled"


def _blocks(content, where):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of blocks")
    return content


def _anthropic_user(content, where):
    """User blocks -> user messages and tool messages, in block order."""
    out, texts = [], []
    for j, block in enumerate(_blocks(content, where)):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_string(block.get("text"), f"{where}[{j}].text"))
        elif kind == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n\n".join(texts)})
                texts = []
            result = block.get("content")
            inner = f"{where}[{j}].content"
            out.append({"role": "tool", "tool_call_id": _string(block.get("tool_use_id"), f"{where}[{j}].tool_use_id"),
                        "content": _text_only(_blocks(result, inner) if result is not None else None, inner)})
        else:
            raise RequestError(f"user content block of type {kind!r} is not supported "
                               "(DeepSeek V4 is a text model)")
    if texts or not out:
        out.append({"role": "user", "content": "\n\n".join(texts)})
    return out


def _anthropic_assistant(content, where, prefill):
    texts, thoughts, calls = [], [], []
    for j, block in enumerate(_blocks(content, where)):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_string(block.get("text"), f"{where}[{j}].text"))
        elif kind == "thinking":
            thoughts.append(_string(block.get("thinking"), f"{where}[{j}].thinking"))
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str):
                raise RequestError("tool_use blocks need a string name")
            arguments = block.get("input")
            calls.append({"id": _string(block.get("id"), f"{where}[{j}].id", default=None), "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": {} if arguments is None else _object(arguments,
                                                                                         f"{where}[{j}].input")}})
        elif kind != "redacted_thinking":  # opaque to us; nothing to render
            raise RequestError(f"assistant content block of type {kind!r} is not supported")
    out = {"role": "assistant", "content": "\n\n".join(texts), "reasoning_content": "\n\n".join(thoughts)}
    if calls:
        out["tool_calls"] = calls
    if prefill:
        out["wo_eos"] = True
    return out


def _anthropic_tools(tools):
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or "input_schema" not in tool or not tool.get("name"):
            raise RequestError("only custom tools with name and input_schema are supported")
        _check_tool(tool, f"tools[{i}]", "input_schema")
        function = {"name": tool["name"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        function["parameters"] = tool["input_schema"]
        out.append({"type": "function", "function": function})
    return out

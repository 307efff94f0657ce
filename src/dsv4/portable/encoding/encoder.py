"""OpenAI-style chat messages -> DeepSeek V4 prompt (encoding spec §2–§3).

DeepSeek ships no chat template, only a Python encoder; this is a clean re-implementation of its
behaviour, byte-exact on every official and generated vector, with these deliberate deviations where
the reference output is a bug or a crash (spec §7, §9).  Each is a normalization of the input, so
well-formed conversations render exactly as the reference renders them:

* Dict tool-call arguments (E19 vs E19b): rendered as their parameters, never wrapped as one
  `arguments` parameter.  Missing/None/blank arguments render no parameters.  A string that is not
  JSON keeps the reference fallback `{"arguments": raw}` (E18, a pinned vector); JSON that is not an
  object raises `EncodingError` (the reference crashes).
* `developer` before the last user turn in thinking mode without tools (E17): the reference deletes it
  and leaves the next assistant turn without `<｜Assistant｜>`.  We keep it: a developer message is a
  user turn for every rule, including history dropping (which then only strips old reasoning).
* `latest_reminder` after a user/tool/developer message (E30): the reference inserts the generation
  prompt before the reminder.  We move the reminder in front of that run of user-side messages, the
  position used in DeepSeek's own data (system, reminder, user – official tests 3 and 4).
* `content: None`: rendered as empty text (the reference prints `None` in tool results and crashes on
  user messages).  Content-part lists are flattened everywhere with the reference's tool-result rule:
  text parts joined by `"\\n\\n"`, any other part as `[Unsupported <type>]` (E25).  The request mappers
  reject non-text parts before they get here.
* A user message merged into the previous user turn (spec §3.1) passes its `task` on to the merged
  turn instead of losing it.
* DSML values are inserted raw (spec §7.7): the model knows no escaping, and as client text they can
  never become control tokens (see `pieces`).

Effort tables: `effort_table` "2604" (V4-Flash/Pro as released: None/high/max) or "0731"
(V4-Flash-0731: low/high/max); `ModelConfig.encoding` names them "dsv4-2604"/"dsv4-0731", also accepted.
"""

from __future__ import annotations

from .dsml import dumps, render_tool_calls
from .errors import EncodingError
from .pieces import Prompt
from .templates import EFFORT_TABLES, RESPONSE_FORMAT_HEADER, TOOLS_TEMPLATE
from .tokens import (ASSISTANT, BOS, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_CLOSE, THINK_OPEN,
                     USER)

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
USER_SIDE = ("user", "tool", "developer")


def encode_messages(messages, thinking_mode="thinking", reasoning_effort=None, drop_thinking=True,
                    context=None, effort_table="2604", tools=None, add_bos=True) -> str:
    """The prompt string for `messages` (what follows `context`, if given), as the reference renders it."""
    return str(render_prompt(messages, thinking_mode, reasoning_effort, drop_thinking, context,
                             effort_table, tools, add_bos))


def render_prompt(messages, thinking_mode="thinking", reasoning_effort=None, drop_thinking=True,
                  context=None, effort_table="2604", tools=None, add_bos=True) -> Prompt:
    """Like `encode_messages`, but keeps control tokens apart from client text for safe tokenization.

    `tools` (OpenAI request-level tool list) replace any tools on the first message; `context` holds
    messages already in the KV cache: decisions are taken on `context + messages`, only `messages`
    are rendered and no BOS is emitted (spec §3.10).
    """
    if thinking_mode not in ("thinking", "chat"):
        raise EncodingError(f"thinking_mode must be 'thinking' or 'chat', got {thinking_mode!r}")
    table = effort_table_for(effort_table)
    if reasoning_effort not in table:
        allowed = ", ".join(repr(k) for k in table)
        raise EncodingError(f"reasoning_effort {reasoning_effort!r} is not valid for the "
                            f"{effort_table} checkpoints (allowed: {allowed})")
    context, messages = list(context or []), list(messages)
    if tools:
        context, messages = _attach_tools(context, messages, tools)
    ctx = _prepare(context)
    full = ctx + _prepare(messages)
    _order_tool_results(full)

    state = _State(full=full, thinking=thinking_mode == "thinking",
                   drop=drop_thinking and not any(m.get("tools") for m in full))
    prompt = Prompt()
    if add_bos and not ctx:
        prompt.control(BOS)
    for i in range(len(ctx), len(full)):
        if i == 0 and state.thinking:
            prompt.text(table[reasoning_effort])
        _render_message(prompt, state, i)
        _render_transition(prompt, state, i)
    return prompt


def effort_table_for(name: str) -> dict:
    """Effort table by checkpoint variant: "2604"/"0731", or ModelConfig's "dsv4-2604"/"dsv4-0731"."""
    key = name.removeprefix("dsv4-") if isinstance(name, str) else name
    if key not in EFFORT_TABLES:
        raise EncodingError(f"effort_table must be '2604' or '0731', got {name!r}")
    return EFFORT_TABLES[key]


class _State:
    """Conversation-wide facts every message's rendering depends on."""

    def __init__(self, full, thinking, drop):
        self.full = full
        self.thinking = thinking
        self.drop = drop
        self.last_user = max((i for i, m in enumerate(full) if m["role"] in ("user", "developer")),
                             default=-1)


# ---------------------------------------------------------------- input normalization


def _attach_tools(context, messages, tools):
    """Put request-level tools on the conversation's first system/developer message (or a new one)."""
    seq = context or messages
    if seq and isinstance(seq[0], dict) and seq[0].get("role") in ("system", "developer"):
        seq = [{**seq[0], "tools": tools}, *seq[1:]]
    else:
        seq = [{"role": "system", "content": "", "tools": tools}, *seq]
    return (seq, messages) if context else (context, seq)


def _prepare(raw):
    """Validated copies, reminders moved before user turns, tool results folded (spec §3.1)."""
    msgs = [_normalize(m) for m in raw]
    ordered = []
    for m in msgs:
        if m["role"] == "latest_reminder":
            j = len(ordered)
            while j and ordered[j - 1]["role"] in USER_SIDE:
                j -= 1
            ordered.insert(j, m)
        else:
            ordered.append(m)
    return _fold_tool_results(ordered)


def _normalize(m):
    if not isinstance(m, dict):
        raise EncodingError(f"a message must be an object, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise EncodingError(f"unsupported role {role!r} (expected one of {', '.join(ROLES)})")
    out = dict(m)
    out["content"] = flatten_content(m.get("content"))
    if role == "assistant":
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        out["reasoning_content"] = flatten_content(reasoning)
        if not isinstance(m.get("tool_calls") or [], list):
            raise EncodingError("assistant tool_calls must be a list")
    task = m.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise EncodingError(f"unknown task {task!r} (expected one of {', '.join(TASK_TOKENS)})")
    return out


def flatten_content(content) -> str:
    """Message content as text: None -> "", part lists joined by a blank line (spec §3.4, E25)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise EncodingError(f"content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(part.get("text") or "")
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            parts.append(f"[Unsupported {kind}]")
    return "\n\n".join(parts)


def _fold_tool_results(msgs):
    """Tool messages become `tool_result` blocks of a user turn; adjacent user messages merge."""
    out = []
    for m in msgs:
        prev = out[-1] if out and out[-1]["role"] == "user" else None
        if m["role"] == "tool":
            block = {"type": "tool_result", "id": m.get("tool_call_id") or "", "text": m["content"]}
            if prev is not None:
                prev["blocks"].append(block)
            else:
                out.append({"role": "user", "blocks": [block]})
        elif m["role"] == "user":
            block = {"type": "text", "text": m["content"]}
            if prev is not None and not prev.get("task"):
                prev["blocks"].append(block)
                if m.get("task"):
                    prev["task"] = m["task"]
            else:
                merged = {"role": "user", "blocks": [block]}
                merged.update({k: m[k] for k in ("task", "wo_eos") if k in m})
                out.append(merged)
        else:
            out.append(m)
    return out


def _order_tool_results(full):
    """Sort each turn's tool results into the order of the calls they answer (spec §3.2, E10)."""
    order = {}
    for m in full:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {}
            for pos, call in enumerate(m["tool_calls"]):
                call_id = call.get("id") or (call.get("function") or {}).get("id")
                if call_id:
                    order[call_id] = pos
        elif m["role"] == "user" and order:
            slots = [k for k, b in enumerate(m["blocks"]) if b["type"] == "tool_result"]
            if len(slots) >= 2:
                ranked = sorted((m["blocks"][k] for k in slots), key=lambda b: order.get(b["id"], 0))
                for k, block in zip(slots, ranked):
                    m["blocks"][k] = block


# ---------------------------------------------------------------- rendering


def _render_message(prompt: Prompt, state: _State, i: int) -> None:
    m = state.full[i]
    role = m["role"]
    if role == "system":
        prompt.text(m["content"])
        _render_sections(prompt, m)
    elif role == "developer":
        if not m["content"]:
            raise EncodingError("a developer message needs non-empty content")
        prompt.control(USER)
        prompt.text(m["content"])
        _render_sections(prompt, m)
    elif role == "user":
        prompt.control(USER)
        for k, block in enumerate(m["blocks"]):
            if k:
                prompt.text("\n\n")
            if block["type"] == "tool_result":
                prompt.text(f"<tool_result>{block['text']}</tool_result>")
            else:
                prompt.text(block["text"])
    elif role == "latest_reminder":
        prompt.control(LATEST_REMINDER)
        prompt.text(m["content"])
    else:
        _render_assistant(prompt, state, i)


def _render_assistant(prompt: Prompt, state: _State, i: int) -> None:
    m = state.full[i]
    after_task = i > 0 and state.full[i - 1].get("task")
    if state.thinking and not after_task and (not state.drop or i > state.last_user):
        prompt.text(m["reasoning_content"])
        prompt.control(THINK_CLOSE)
    prompt.text(m["content"])
    if m.get("tool_calls"):
        render_tool_calls(prompt, m["tool_calls"])
    if not m.get("wo_eos"):
        prompt.control(EOS)


def _render_sections(prompt: Prompt, m: dict) -> None:
    """The tools and response-format sections of a system/developer message (spec §3.6, §3.8)."""
    if m.get("tools"):
        schemas = []
        for tool in m["tools"]:
            if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
                raise EncodingError("each tool must be {'type': 'function', 'function': {...}}")
            schemas.append(dumps(tool["function"]))
        head, tail = TOOLS_TEMPLATE.split("{schemas}")
        prompt.text("\n\n")
        prompt.template(head)
        prompt.text("\n".join(schemas))
        prompt.template(tail)
    if m.get("response_format"):
        prompt.text("\n\n" + RESPONSE_FORMAT_HEADER + dumps(m["response_format"]))


def _render_transition(prompt: Prompt, state: _State, i: int) -> None:
    """What follows message i: the generation prompt or a task token (spec §3.5)."""
    m = state.full[i]
    if i + 1 < len(state.full) and state.full[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return
    task = m.get("task")
    if task == "action":
        prompt.control(ASSISTANT)
        prompt.control(THINK_OPEN if state.thinking else THINK_CLOSE)
        prompt.control(TASK_TOKENS["action"])
    elif task:
        prompt.control(TASK_TOKENS[task])
    elif m["role"] in ("user", "developer"):
        prompt.control(ASSISTANT)
        keep = state.thinking and (not state.drop or i >= state.last_user)
        prompt.control(THINK_OPEN if keep else THINK_CLOSE)

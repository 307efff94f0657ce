"""`dsv4 generate`: one prompt, one answer, streamed.

The answer goes to stdout and everything else (reasoning, the stats line, notices) to stderr, so
`dsv4 generate "…" > answer.txt` captures only the answer; `--json` prints one object instead.
Exit status: 0 on a finished answer (stop or length), 130 when Ctrl-C cut it short, and the codes of
`errors` for user errors.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..portable.encoding import ContentDelta, ReasoningDelta, ToolCallEvent
from . import options as opt
from .console import console
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, CliError
from .resolve import load_model
from .session import ChatSession, Interrupt, peak_rss_bytes, stats_line


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise CliError("no prompt: pass it as an argument or pipe it on stdin", EXIT_USAGE)
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CliError("the prompt is empty", EXIT_USAGE)
    return prompt


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' or nothing reads it from stdin.")] = None,
    model: opt.Model = None, backend: opt.Backend = "auto", dtype: opt.Dtype = "auto",
    context: opt.Context = None, force: opt.Force = False, parallel: opt.Parallel = None, threads: opt.Threads = None,
    system: opt.System = None, mode: opt.Mode = "chat", max_tokens: opt.MaxTokens = 256,
    temperature: opt.Temperature = 0.0, top_p: opt.TopP = 1.0, top_k: opt.TopK = 0, min_p: opt.MinP = 0.0,
    repetition_penalty: opt.RepetitionPenalty = 1.0, seed: opt.Seed = None, stop: opt.Stop = None,
    hide_thinking: opt.HideThinking = False, draft_tokens: opt.DraftTokens = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (reasoning, content, "
                                                          "tool calls, usage) instead of streaming.")] = False,
):
    """Generate one answer to a prompt (or stdin), streaming it to stdout."""
    sampling = opt.sampling_params(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    opt.check_positive("--max-tokens", max_tokens)
    opt.check_mode(mode)
    text = read_prompt(prompt)
    opt.check_draft_tokens(draft_tokens)
    m = load_model(model, backend, dtype, context, force, parallel=parallel, threads=threads)
    opt.check_draft_tokens(draft_tokens, m)
    session = ChatSession(m, mode=mode, system=system, sampling=sampling, max_tokens=max_tokens, stop=stop or (),
                          draft_tokens=draft_tokens)
    err = console(stderr=True)
    state = {"in_reasoning": False}

    def show(ev):
        if json_out:
            return
        if isinstance(ev, ReasoningDelta):
            if not hide_thinking:
                err.print(ev.text, style="dim italic", end="", markup=False, soft_wrap=True)
                state["in_reasoning"] = True
            return
        if state["in_reasoning"]:
            err.print()
            state["in_reasoning"] = False
        if isinstance(ev, ContentDelta):
            sys.stdout.write(ev.text)
        elif isinstance(ev, ToolCallEvent):
            sys.stdout.write(f"\n[tool call] {ev.name} {ev.arguments}\n")
        sys.stdout.flush()

    with Interrupt() as interrupt:
        res = session.turn(text, show, interrupt)
    if json_out:
        out = {"model": str(m.path), "backend": m.backend, "dtype": m.dtype, "mode": mode,
               "reasoning": res.reasoning, "content": res.content, "tool_calls": res.tool_calls,
               "finish_reason": res.finish_reason, "usage": res.usage(), "timings": res.timings(),
               "peak_rss_bytes": peak_rss_bytes()}
        if res.warnings:
            out["warnings"] = res.warnings
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    else:
        if state["in_reasoning"]:
            err.print()
        sys.stdout.write("\n")
        err.print(stats_line(res, m, session.context_used, drafts=draft_tokens is not None), style="dim",
                  markup=False, soft_wrap=True)
    if res.finish_reason == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)

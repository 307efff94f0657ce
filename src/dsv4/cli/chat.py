"""`dsv4 chat`: an interactive multi-turn REPL.

Answers stream as they decode; reasoning is printed dim, or with `--hide-thinking` (or `/thinking off`)
collapsed into one "thought for …" line that `/think` expands.  Ctrl-C stops the answer and returns to
the prompt (a second Ctrl-C aborts the step at once); at the prompt, Ctrl-D or /exit quits.  Every turn
ends with the stats line of `session.stats_line`: tokens and tok/s of the answer and of the prompt (and
how many prompt tokens came from the cached prefix), peak memory, context used.  The conversation
prefix is reused between turns (see `session`), and with `--prompt-cache DIR` between runs too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..portable.encoding import ContentDelta, ReasoningDelta, ToolCallEvent
from ..portable.runtime import ContextError
from . import options as opt
from .console import console
from .resolve import DEMO_CHAT, is_demo, load_model
from .session import MODES, ChatSession, Interrupt, stats_line

SAVE_FORMAT = "dsv4-chat"
HELP = """commands:
  /reset            forget the conversation (keeps the system prompt)
  /mode [MODE]      show or set the mode: chat, thinking, max
  /system [TEXT]    show or set the system prompt (/system - clears it)
  /thinking on|off  print the reasoning, or collapse it into one line
  /think            print the last answer's reasoning in full
  /save FILE        save the conversation as JSON
  /load FILE        load a conversation saved with /save
  /stats            session statistics
  /help             this help
  /exit             quit (also /quit or Ctrl-D)
Ctrl-C stops the current answer."""


class TurnPrinter:
    """Prints one turn's events: reasoning dim (or as a collapsed status line), content plain, tool calls."""

    def __init__(self, console: Console, show_thinking: bool):
        self.console, self.show_thinking = console, show_thinking
        self.phase = None               # None | "reasoning" | "content"
        self.t0 = time.perf_counter()
        self.reasoning_chars = 0

    def __call__(self, ev) -> None:
        c = self.console
        if isinstance(ev, ReasoningDelta):
            self.phase = "reasoning"
            self.reasoning_chars += len(ev.text)
            if self.show_thinking:
                c.print(ev.text, style="dim italic", end="", markup=False, soft_wrap=True)
            elif c.is_terminal:
                c.file.write(f"\r\x1b[2K⋯ thinking ({self.reasoning_chars} characters)")
                c.file.flush()
            return
        self._close_reasoning()
        self.phase = "content"
        if isinstance(ev, ContentDelta):
            c.print(ev.text, end="", markup=False, soft_wrap=True)
        elif isinstance(ev, ToolCallEvent):
            c.print(f"\n[tool call] {ev.name} {ev.arguments}", style="cyan", markup=False, soft_wrap=True)

    def _close_reasoning(self) -> None:
        if self.phase != "reasoning":
            return
        if self.show_thinking:
            self.console.print()
        else:
            if self.console.is_terminal:
                self.console.file.write("\r\x1b[2K")
            self.console.print(f"⋯ thought for {time.perf_counter() - self.t0:.1f} s "
                               f"({self.reasoning_chars} characters; /think shows it)", style="dim")
        self.phase = "closed"

    def finish(self) -> None:
        self._close_reasoning()
        if self.phase == "content":
            self.console.print()


class Repl:
    def __init__(self, session: ChatSession, console: Console, show_thinking: bool):
        self.session, self.console, self.show_thinking = session, console, show_thinking
        self.commands = {"/help": self.cmd_help, "/exit": self.cmd_exit, "/quit": self.cmd_exit,
                         "/reset": self.cmd_reset, "/mode": self.cmd_mode, "/system": self.cmd_system,
                         "/thinking": self.cmd_thinking, "/think": self.cmd_think, "/save": self.cmd_save,
                         "/load": self.cmd_load, "/stats": self.cmd_stats}
        self.running = True

    # ------------------------------------------------------------------------------ loop
    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        m = self.session.model
        self.console.print(f"dsv4 chat · {m.path.name} on {m.backend}/{m.dtype} · context {m.context} · "
                           f"mode {self.session.mode}", style="bold", markup=False)
        self.console.print("/help lists commands · Ctrl-C stops an answer · /exit or Ctrl-D quits", style="dim")
        while self.running:
            try:
                line = input(">>> ")
            except EOFError:
                self.console.print()
                break
            except KeyboardInterrupt:
                self.console.print("\n(/exit or Ctrl-D quits)", style="dim")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                self.dispatch(line)
            else:
                self.answer(line)

    def dispatch(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            self.error(f"unknown command {name}; /help lists them")
            return
        handler(arg.strip())

    def answer(self, text: str) -> None:
        printer = TurnPrinter(self.console, self.show_thinking)
        try:
            with Interrupt() as interrupt:
                res = self.session.turn(text, printer, interrupt)
        except ContextError as e:
            printer.finish()
            self.error(f"{e}; /reset starts a new conversation")
            return
        except KeyboardInterrupt:
            printer.finish()
            self.console.print("[aborted]", style="yellow")
            return
        printer.finish()
        s = self.session
        tag = "[interrupted] " if res.finish_reason == "interrupted" else ""
        self.console.print(tag + stats_line(res, s.model, s.context_used, s.draft_tokens is not None),
                           style="yellow" if tag else "dim", markup=False, soft_wrap=True)

    def error(self, message: str) -> None:
        self.console.print(f"error: {message}", style="red", markup=False)

    # --------------------------------------------------------------------------- commands
    def cmd_help(self, arg: str) -> None:
        self.console.print(HELP, markup=False)

    def cmd_exit(self, arg: str) -> None:
        self.running = False

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.console.print("conversation cleared", style="dim")

    def cmd_mode(self, arg: str) -> None:
        if arg:
            if arg not in MODES:
                self.error(f"mode must be one of {', '.join(MODES)}, got {arg!r}")
                return
            self.session.set_mode(arg)
        self.console.print(f"mode: {self.session.mode}", style="dim")

    def cmd_system(self, arg: str) -> None:
        if arg:
            self.session.system = None if arg == "-" else arg
        shown = self.session.system if self.session.system is not None else "(none)"
        self.console.print(f"system prompt: {shown}", style="dim", markup=False)

    def cmd_thinking(self, arg: str) -> None:
        if arg not in ("on", "off"):
            self.error("usage: /thinking on|off")
            return
        self.show_thinking = arg == "on"
        self.console.print(f"reasoning is {'shown' if self.show_thinking else 'collapsed'}", style="dim")

    def cmd_think(self, arg: str) -> None:
        text = self.session.last.reasoning
        self.console.print(text if text else "(the last answer has no reasoning)", style="dim italic",
                           markup=False, soft_wrap=True)

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.error("usage: /save FILE")
            return
        s = self.session
        data = {"format": SAVE_FORMAT, "version": 1, "mode": s.mode, "system": s.system, "messages": s.messages}
        try:
            Path(arg).expanduser().write_text(json.dumps(data, ensure_ascii=False, indent=1))
        except OSError as e:
            self.error(f"cannot write {arg}: {e.strerror}")
            return
        self.console.print(f"saved {len(s.messages)} messages to {arg}", style="dim", markup=False)

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.error("usage: /load FILE")
            return
        try:
            data = json.loads(Path(arg).expanduser().read_text())
        except OSError as e:
            self.error(f"cannot read {arg}: {e.strerror}")
            return
        except ValueError:
            self.error(f"{arg} is not JSON")
            return
        ok = (isinstance(data, dict) and data.get("format") == SAVE_FORMAT and data.get("mode") in MODES
              and isinstance(data.get("messages"), list))
        if not ok:
            self.error(f"{arg} is not a conversation saved by /save")
            return
        s = self.session
        s.reset()
        s.set_mode(data["mode"])
        s.system = data.get("system")
        s.messages = data["messages"]
        self.console.print(f"loaded {len(s.messages)} messages (mode {s.mode})", style="dim", markup=False)

    def cmd_stats(self, arg: str) -> None:
        s, st = self.session, self.session.stats
        rate = (st.completion_tokens - st.turns) / st.decode_s if st.decode_s > 0 else 0.0
        self.console.print(
            f"turns {st.turns} · prompt tokens {st.prompt_tokens} ({st.cached_tokens} from cache) · generated "
            f"{st.completion_tokens} · decode {rate:.1f} tok/s · context {s.context_used}/{s.model.context} · "
            f"{s.model.backend}/{s.model.dtype} · mode {s.mode}", markup=False, soft_wrap=True)


def chat(model: opt.Model = None, backend: opt.Backend = "auto", dtype: opt.Dtype = "auto",
         context: opt.Context = None, force: opt.Force = False, parallel: opt.Parallel = None,
         threads: opt.Threads = None,
         system: opt.System = None,
         mode: opt.Mode = "chat", max_tokens: opt.MaxTokens = 512, temperature: opt.Temperature = 0.6,
         top_p: opt.TopP = 0.95, top_k: opt.TopK = 0, min_p: opt.MinP = 0.0,
         repetition_penalty: opt.RepetitionPenalty = 1.0, seed: opt.Seed = None,
         hide_thinking: opt.HideThinking = False, draft_tokens: opt.DraftTokens = None,
         prompt_cache: Annotated[Optional[str], typer.Option(
             "--prompt-cache", help="Also keep prompt states in this directory, so a later chat resumes "
                                    "them (default: in memory only).")] = None,
         prompt_cache_gb: opt.PromptCacheGB = 8.0):
    """Chat with the model in the terminal (multi-turn, streaming, slash commands)."""
    sampling = opt.sampling_params(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    opt.check_positive("--max-tokens", max_tokens)
    opt.check_mode(mode)
    opt.check_above_zero("--prompt-cache-gb", prompt_cache_gb)
    opt.check_draft_tokens(draft_tokens)
    m = load_model(model, backend, dtype, context, force, parallel=parallel, threads=threads)
    opt.check_draft_tokens(draft_tokens, m)
    session = ChatSession(m, mode=mode, system=system, sampling=sampling, max_tokens=max_tokens,
                          prompt_store=opt.prompt_store(m, prompt_cache, prompt_cache_gb),
                          draft_tokens=draft_tokens)
    if is_demo(m.config):
        console().print(DEMO_CHAT, style="dim", markup=False, soft_wrap=True)
    Repl(session, console(), show_thinking=not hide_thinking).run()

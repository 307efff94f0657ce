"""Option declarations shared by several commands, so `--model`, `--backend`, sampling flags… read the
same everywhere (and the server's command can reuse them), and `FlagHelp`, which shows on/off flags
(`--json`, `--force`, `--help`…) in the help without a value type they do not take."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from ..portable.sampling import SamplingParams
from .errors import EXIT_USAGE, CliError
from .resolve import BACKEND_CHOICES, DTYPE_CHOICES

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Checkpoint directory (official layout, converted or ONNX export), or demo|demo-random|tiny|tiny2. "
                          "Default: the demo model (a tiny V4 trained on arithmetic, shipped in the package).")]
Backend = Annotated[str, typer.Option(
    "--backend", "-b", help=f"Backend: {'|'.join(BACKEND_CHOICES)}. auto = MLX on Apple silicon, CUDA with a "
                            "GPU, else the fastest installed CPU backend.")]
Dtype = Annotated[str, typer.Option("--dtype", help=f"Compute dtype: {'|'.join(DTYPE_CHOICES)}.")]
Context = Annotated[Optional[int], typer.Option(
    "--context", "-c", help="Longest sequence in tokens (a limit: the state grows with the text). "
                              "Default: 4096 or the model's maximum.")]
Force = Annotated[bool, typer.Option("--force", help="Load even if the memory estimate says it will not fit.")]
Parallel = Annotated[Optional[int], typer.Option(
    "--parallel", help="Split the model over N local ranks (tensor + expert parallel; cuda/torch or mlx "
                       "backend). Under torchrun or mlx.launch the ranks come from the launcher.")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads for the cpu and onnx backends (default: every core this process may use, "
                      "or OMP_NUM_THREADS).")]
Mode = Annotated[str, typer.Option("--mode", help="chat (no reasoning), thinking (high effort) or max.")]
System = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below min-p × the top probability.")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty", help="> 1 discourages repeats.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text is generated (repeatable).")]
HideThinking = Annotated[bool, typer.Option("--hide-thinking", help="Do not print the reasoning.")]
DraftTokens = Annotated[Optional[int], typer.Option(
    "--draft-tokens", help="Tokens the MTP block drafts per decode step (speculative decoding, same output; "
                           "0 = off). Default: 2 when the model has an MTP layer and its output head is a small "
                           "part of its weights (dropped for an answer whose drafts are mostly rejected), "
                           "else 0.")]
PromptCacheGB = Annotated[float, typer.Option(
    "--prompt-cache-gb", help="Size bound of the prompt cache directory in GB (least recently used states "
                              "are deleted).")]



class FlagHelp:
    """Command-class mixin: an on/off flag gets an empty metavar, so the help shows `--json`, not
    `--json <bool>` (recent typer prints every option's value type, flags included, although a flag
    refuses a value)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and not getattr(p, "count", False) and p.metavar is None:
                p.metavar = ""
        return params


class Command(FlagHelp, TyperCommand):
    """The class of every `dsv4` subcommand."""


_FLAG = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
         "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


def sampling_params(temperature: float, top_p: float, top_k: int, min_p: float, repetition_penalty: float,
                    seed: int | None) -> SamplingParams:
    """SamplingParams from the flags; a bad value becomes `--flag must be …` (exit 2)."""
    try:
        return SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    except ValueError as e:
        name, _, why = str(e).partition(" ")
        raise CliError(f"{_FLAG.get(name, name)} {why}", EXIT_USAGE) from None


def check_draft_tokens(value: int | None, model=None, flag: str = "--draft-tokens") -> int | None:
    """None (the model's default) or what `speculative.check_draft_tokens` accepts, as a usage error."""
    from ..portable.speculative import check_draft_tokens as check
    if value is None:
        return None
    try:
        return check(value, model, flag)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def check_positive(flag: str, value: int) -> int:
    if value < 1:
        raise CliError(f"{flag} must be ≥ 1, got {value}", EXIT_USAGE)
    return value


def prompt_store(model, directory: str | None, gb: float):
    """The prompt cache on disk (`portable.prompt_store`) of a loaded model in `directory`, or None."""
    if directory is None:
        return None
    from ..portable.prompt_store import StateStore
    return StateStore(model, directory, round(gb * 1e9))


def check_above_zero(flag: str, value: float) -> float:
    """A finite number > 0 (sizes, timeouts), else `--flag must be > 0` (exit 2)."""
    if not 0 < value < float("inf"):
        raise CliError(f"{flag} must be > 0, got {value:g}", EXIT_USAGE)
    return value


def check_mode(mode: str, flag: str = "--mode") -> str:
    from .session import MODES
    if mode not in MODES:
        raise CliError(f"{flag} must be one of {', '.join(MODES)}, got {mode!r}", EXIT_USAGE)
    return mode

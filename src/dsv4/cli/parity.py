"""`dsv4 parity`: the correctness ladder on this machine, for every installed backend, in one table.

For each backend × dtype, against the NumPy reference in float64 (the oracle):
  logits  max over positions of max|logits − oracle| / max|oracle| for a one-shot forward of N random
          tokens (N = 300 by default crosses the 128-token window, the ratio-4 overlap and two ratio-128
          blocks);
  state   the same measure between the backend's own one-shot forward and the same tokens fed as a
          prefill, single-token decodes and uneven chunks (state consistency, model spec §11.2);
  greedy  greedy continuation vs the oracle's: identical, or diverging only where the oracle's top-2
          logit gap is within the dtype's error bound (a near tie either answer may take).
bfloat16 rows are judged statistically, as the backend tests do (bf16 rounding alone flips MoE routing on
a random model, so no per-position bound holds): the median per-position error must stay within twice the
reference's own bf16 emulation (the floor), and argmax agreement with the oracle over the N positions
within 10 points of the floor's.  A row fails when an error exceeds its bound or the greedy tokens
diverge; the exit status is 1 if any row failed.  Unavailable backends are listed as skipped, with the
command that installs them.  The ONNX row needs an export: pass `--onnx DIR`, or let parity export the
model into a temporary directory when `dsv4.export` is installed and the export is small.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..portable.install import install_command
from ..portable.layout import is_export
from ..portable.runtime import BackendError, backend_names, get_backend
from . import options as opt
from .console import console
from .errors import EXIT_FAILURE, EXIT_USAGE, CliError
from .resolve import DEMO_NOTICE, is_demo, model_config, model_dir

BOUNDS = {"float64": 1e-10, "float32": 1e-4, "bfloat16": None}       # bfloat16: relative to the floor
PROMPT_TOKENS = 24
AUTO_EXPORT_LIMIT = 2 << 30          # bytes of ONNX weight data parity may write to a temporary directory


@dataclass
class Row:
    backend: str
    dtype: str
    status: str                      # pass | fail | skipped | error
    logits_err: float | None = None
    state_err: float | None = None
    greedy: str = ""
    bound: float | None = None
    note: str = ""


def rel_err(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """max|got − ref| / max|ref| per position (rows are positions)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.abs(got - ref).max(-1) / np.abs(ref).max(-1)


def split_sizes(n: int) -> list[int]:
    """A prefill, four single-token decodes and two uneven chunks summing to n."""
    first = n // 2 + 1
    rest = n - first - 4
    return [first, 1, 1, 1, 1, rest // 3, rest - rest // 3]


def chunked_logits(model, ids: np.ndarray) -> np.ndarray:
    state, outs, a = model.new_state(1), [], 0
    for size in split_sizes(len(ids)):
        logits, state = model.step(state, ids[None, a:a + size])
        outs.append(logits[0])
        a += size
    return np.concatenate(outs, 0)


@dataclass
class Oracle:
    ids: np.ndarray
    logits: np.ndarray
    greedy: list
    margins: list                    # top-1 minus top-2 logit of the oracle at each greedy step
    scale: float
    bf16_floor: tuple | None = None  # (median rel err, argmax agreement) of the reference's bf16 emulation


def oracle(path: Path, n: int, gen: int, context: int, seed: int, bf16: bool) -> Oracle:
    import dsv4
    ref = dsv4.load(path, backend="reference", dtype="float64", context=context)
    ids = np.random.default_rng(seed).integers(3, ref.config.vocab_size, n)
    logits = ref.forward(ids, full_precision=True)
    toks, margins = [], []
    for t in ref.stream(ids[:PROMPT_TOKENS], max_tokens=gen, stop_ids=[], top_logprobs=2):
        toks.append(t.id)
        margins.append(t.top_logprobs[0][1] - t.top_logprobs[1][1])
    orc = Oracle(ids, logits, toks, margins, float(np.abs(logits).max()))
    if bf16:
        emu = dsv4.load(path, backend="reference", dtype="bfloat16", context=context).forward(ids)
        orc.bf16_floor = (float(np.median(rel_err(emu, logits))), argmax_agreement(emu, logits))
    return orc


def argmax_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    return float((np.asarray(got).argmax(-1) == np.asarray(ref).argmax(-1)).mean())


def greedy_verdict(got: list, orc: Oracle, bound: float) -> tuple[bool, str]:
    n = len(orc.greedy)
    same = next((i for i, (a, b) in enumerate(zip(got, orc.greedy)) if a != b), n)
    if same == n:
        return True, f"{n}/{n}"
    tie = orc.margins[same] <= 2 * bound * orc.scale
    return tie, f"{same}/{n} ({'near tie' if tie else 'diverged'} at {same})"


def check_backend(path: Path, backend: str, dtype: str, orc: Oracle, context: int) -> Row:
    import dsv4
    m = dsv4.load(path, backend=backend, dtype=dtype, context=context)
    one = m.forward(orc.ids)
    logits, state = rel_err(one, orc.logits), rel_err(chunked_logits(m, orc.ids), one)
    if dtype == "bfloat16":
        floor_err, floor_agree = orc.bf16_floor
        row = Row(backend, dtype, "pass", float(np.median(logits)), float(np.median(state)), bound=2 * floor_err)
        agree = argmax_agreement(one, orc.logits)
        ok = agree >= floor_agree - 0.1
        row.greedy = f"argmax {agree:.0%}"
    else:
        row = Row(backend, dtype, "pass", float(logits.max()), float(state.max()), bound=BOUNDS[dtype])
        got = m.generate(orc.ids[:PROMPT_TOKENS], max_tokens=len(orc.greedy), stop_ids=[]).tokens
        ok, row.greedy = greedy_verdict(got, orc, row.bound)
    if not (ok and row.logits_err <= row.bound and row.state_err <= row.bound):
        row.status = "fail"
    return row


def onnx_export_dir(path: Path, onnx: Path | None, context: int, tmp: Path) -> tuple[Path | None, str]:
    """(directory to run the ONNX row on, or None with the reason)."""
    if onnx is not None:
        return onnx, ""
    try:
        from ..export import estimate_size, export_onnx
    except ImportError:
        return None, f"dsv4.export needs the onnx extra ({install_command('onnx')}), or pass --onnx DIR"
    if estimate_size(path) > AUTO_EXPORT_LIMIT:
        return None, "model too large to export on the fly; pass --onnx DIR (dsv4 export onnx MODEL DIR)"
    return export_onnx(path, tmp / "onnx", context=context, check=False), ""


def run(path: Path, backends: list[str], dtypes: list[str], n: int, gen: int, seed: int,
        onnx: Path | None, on_row=lambda row: None) -> list[Row]:
    context = max(n, PROMPT_TOKENS + gen)
    orc = oracle(path, n, gen, context, seed, "bfloat16" in dtypes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsv4-parity-") as tmp:
        for backend in backends:
            try:
                get_backend(backend)
            except BackendError as e:
                rows.append(Row(backend, "-", "skipped", note=str(e)))
                on_row(rows[-1])
                continue
            src = path
            if backend == "onnx":
                src, why = onnx_export_dir(path, onnx, context, Path(tmp))
                if src is None:
                    rows.append(Row(backend, "-", "skipped", note=why))
                    on_row(rows[-1])
                    continue
            for dt in (["float32"] if backend == "onnx" else dtypes):
                try:
                    rows.append(check_backend(src, backend, dt, orc, context))
                except Exception as e:          # a backend that crashes fails its row; the others still run
                    rows.append(Row(backend, dt, "error", note=f"{type(e).__name__}: {e}".splitlines()[0]))
                on_row(rows[-1])
    return rows


def _fmt(x: float | None, bound: float | None) -> str:
    if x is None:
        return "-"
    style = "green" if bound is None or x <= bound else "red"
    return f"[{style}]{x:.1e}[/{style}]"


def render(rows: list[Row], out: Console) -> None:
    """The rows as a table; cells are markup, so every text from outside (notes carry install commands
    such as `pip install -e '.[mlx]'`, whose brackets rich would take for a style) is escaped."""
    t = Table(title="parity vs reference float64", title_justify="left")
    for col in ("backend", "dtype", "logits err", "state err", "bound", "greedy", "result"):
        t.add_column(col, no_wrap=col != "result")
    colors = {"pass": "green", "fail": "red", "error": "red", "skipped": "dim"}
    for r in rows:
        result = f"[{colors[r.status]}]{r.status}[/{colors[r.status]}]"
        if r.note:
            result += f" [dim]{escape(r.note)}[/dim]"
        t.add_row(escape(r.backend), escape(r.dtype), _fmt(r.logits_err, r.bound), _fmt(r.state_err, r.bound),
                  "-" if r.bound is None else f"{r.bound:.0e}", escape(r.greedy) or "-", result)
    out.print(t)
    if any(r.dtype == "bfloat16" for r in rows):
        out.print("bfloat16 rows: median errors, bound = 2 × the reference's bf16 emulation; greedy = "
                      "argmax agreement with float64 over all positions", style="dim")


def parity(
    model: opt.Model = None,
    backend: Annotated[Optional[list[str]], typer.Option(
        "--backend", "-b", help="Check only these backends (repeatable). Default: every known backend.")] = None,
    dtype: Annotated[Optional[list[str]], typer.Option(
        "--dtype", help=f"Dtypes to check (repeatable): {', '.join(BOUNDS)}. Default: float32.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Random tokens for the logit and state checks.")] = 300,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Greedy tokens to compare.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random token ids.")] = 0,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="ONNX export of the model for the onnx row.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
):
    """Correctness ladder on every available backend vs the float64 reference; exit 1 on failure."""
    names = backend or sorted(backend_names(), key=lambda b: (b != "reference", b))
    for b in names:
        if b not in backend_names():
            raise CliError(f"unknown backend {b!r}; choose from {', '.join(backend_names())}", EXIT_USAGE)
    dtypes = dtype or ["float32"]
    for d in dtypes:
        if d not in BOUNDS:
            raise CliError(f"--dtype must be one of {', '.join(BOUNDS)}, got {d!r}", EXIT_USAGE)
    if tokens < 16:
        raise CliError(f"--tokens must be ≥ 16, got {tokens}", EXIT_USAGE)
    opt.check_positive("--gen-tokens", gen_tokens)
    if onnx is not None and not is_export(onnx):
        raise CliError(f"--onnx {onnx}: not a dsv4 ONNX export directory (no dsv4 export manifest.json)",
                       EXIT_USAGE)
    path = model_dir(model)
    err = console(stderr=True)
    if is_demo(model_config(path)):
        err.print(DEMO_NOTICE, style="yellow", soft_wrap=True)
    with err.status("checking…") as status:
        rows = run(path, names, dtypes, tokens, gen_tokens, seed, onnx,
                   on_row=lambda r: status.update(f"checked {r.backend} {r.dtype}: {r.status}"))
    if json_out:
        sys.stdout.write(json.dumps({"model": str(path), "tokens": tokens, "gen_tokens": gen_tokens,
                                     "rows": [asdict(r) for r in rows]}) + "\n")
    else:
        render(rows, console())
    if any(r.status in ("fail", "error") for r in rows):
        raise typer.Exit(EXIT_FAILURE)

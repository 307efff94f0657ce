"""`dsv4 info`: what a model is and what it will cost, without loading it.

Everything comes from config.json and the safetensors headers (or, for a preset such as `flash` with no
weights here, from the config and the tensor schema): configuration, the per-layer attention kinds,
parameter counts, stored bytes per format, state bytes at N tokens, and the memory estimate of every
backend (the same estimate the loader checks before loading).

It also reports what is wrong with what it reads: a checkpoint whose headers do not match its config
(missing, unexpected, mistyped or truncated tensors) or whose tokenizer does not fit the model is shown
as far as it can be read, its problems are listed, and the command fails with one line naming the first
of them (exit 3).  `--check` adds what only reading all the weights can tell — NaN/Inf values — which
is what `dsv4.load` checks, without loading.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..backends import catalog
from ..portable.cache import bytes_per_token, state_bytes
from ..portable.checkpoint import Checkpoint, CheckpointError, schema
from ..portable.config import PRESETS, ModelConfig, preset
from ..portable.encoding.tokenizer import TokenizerError
from ..portable.layout import backend_of
from ..portable.runtime import backend_names, own_tokenizer
from . import options as opt
from .console import console
from .errors import EXIT_USAGE, CliError
from .progress import progress_bar
from .resolve import (SYNTHETIC, available_memory, backend_available, estimate_memory,
                      human_bytes, model_config, model_dir, pick_dtype, resolve_context)

SHOWN_IN_TABLE = 20         # problems listed under the tables (--json lists all)

FORMAT_NAMES = {"F8_E4M3": "FP8 e4m3", "I8": "FP4 e2m1 (packed)", "F8_E8M0": "E8M0 scales", "U8": "uint8",
                "BF16": "BF16", "F16": "F16", "F32": "F32", "I32": "int32", "I64": "int64"}


def source(model: str | None) -> tuple[Path | None, ModelConfig, str]:
    """(directory or None, config, display name): a preset without weights is described from its config."""
    if model in PRESETS and model not in SYNTHETIC and not Path(model).exists():
        return None, preset(model), f"{model} (preset, no weights here)"
    path = model_dir(model)
    return path, model_config(path), str(path)


def layer_rows(cfg: ModelConfig) -> list[tuple[str, str, str, int]]:
    """(kind, compression, layers, count) for each attention kind, hash-routed layers noted separately."""
    groups: dict = {}
    for layer in range(cfg.num_hidden_layers):
        kind = cfg.kind(layer)
        routing = "hash" if cfg.hash_routed(layer) else "learned"
        groups.setdefault((kind, cfg.ratio(layer), routing), []).append(layer)
    out = [(kind, f"1/{r}" if r else "none (window only)", f"{_ranges(layers)} · {routing} routing", len(layers))
           for (kind, r, routing), layers in groups.items()]
    if cfg.num_nextn_predict_layers:
        out.append(("mtp", "none (window only)", f"{cfg.num_hidden_layers} (next-token prediction)", 1))
    return out


def _ranges(layers: list[int]) -> str:
    parts, start, prev = [], layers[0], layers[0]
    step = layers[1] - layers[0] if len(layers) > 1 else 1
    if len(layers) > 2 and all(b - a == step for a, b in zip(layers, layers[1:])):
        return f"{layers[0]}–{layers[-1]}" + (f" step {step}" if step > 1 else "")
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


def inspect(path: Path | None, cfg: ModelConfig, layout: str | None,
            check: bool) -> tuple[list, list[str], Exception | None]:
    """(the tensor specs to count, the problems found, the error they make) for the model at `path`: what
    `weights` finds, and the tokenizer checked against the model.  The error is the one loading would
    raise, so both tell a problem in the same words."""
    if check and (path is None or layout is not None):
        what = "has no weights here" if path is None else (
            "is an ONNX export" if layout == "onnx" else f"was converted for {layout}")
        raise CliError(f"--check scans a checkpoint in the official layout; {path or 'this preset'} {what}",
                       EXIT_USAGE)
    if path is None:
        return list(schema(cfg)), [], None
    specs, problems, error = weights(path, cfg, layout, check)
    try:
        own_tokenizer(path, cfg)
    except TokenizerError as e:
        problems.append(str(e))
        error = error or e
    return specs, problems, error


def weights(path: Path, cfg: ModelConfig, layout: str | None,
            check: bool) -> tuple[list, list[str], Exception | None]:
    """(specs, problems, error) of the weights at `path`: a checkpoint's readable tensors and every mismatch
    with its config — with `check`, also NaN/Inf values, with a progress bar on stderr while they are
    scanned; the schema for an export.  A converted directory is in its backend's own layout, checked by
    that backend as it loads."""
    if layout == "onnx":
        return list(schema(cfg)), [], None
    try:
        ckpt = Checkpoint(path)
    except CheckpointError as e:
        return [], [str(e)], e
    if layout is not None:
        return ckpt.specs(), [], None
    with progress_bar(f"checking the weights of {path.name}", console(stderr=True), transient=True) as progress:
        problems = ckpt.check(cfg, values=check, progress=progress)
    return ckpt.specs(), problems, CheckpointError.listing(path, problems) if problems else None


def parallel_plan(cfg: ModelConfig, world: int, ctx: int) -> dict:
    """Per-rank memory and per-token communication of a `--parallel world` run (`portable.sharding`):
    stored weight bytes a rank reads (its parts + the replicated tensors), the state every rank holds
    whole at `ctx` tokens, and the collectives of one decode token at that context."""
    from ..portable.sharding import ShardingError, collectives_per_token, memory_plan
    try:
        plan = memory_plan(cfg, world)
    except ShardingError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    comm = collectives_per_token(cfg, world, entries=ctx // 4)       # the indexer scores every CSA entry

    return {"ranks": world, "split_bytes": plan.split, "replicated_bytes": plan.replicated,
            "per_rank_bytes": plan.per_rank, "single_process_bytes": plan.total,
            "state_bytes_per_rank": state_bytes(cfg, ctx, "deploy"), "per_token": comm}


def collect(model: str | None, context: int | None, check: bool = False,
            parallel: int | None = None) -> tuple[dict, Exception | None]:
    """Everything `info` shows, as plain data (also the --json output), and the error its problems make
    (None: the model is usable)."""
    path, cfg, name = source(model)
    ctx = resolve_context(cfg, context)
    counts = cfg.param_counts()
    fmt_backend = backend_of(path) if path is not None else None
    specs, problems, error = inspect(path, cfg, fmt_backend, check)
    weights: dict = {}
    for spec in specs:
        weights[spec.dtype] = weights.get(spec.dtype, 0) + spec.nbytes
    memory = []
    for b in backend_names():
        usable = fmt_backend in (None, b)
        installed = catalog.installed(b) if b in catalog.REQUIRES else backend_available(b)
        dt = pick_dtype("auto", b)
        est = estimate_memory(cfg, path, b, dt, ctx)
        avail, _ = available_memory(b)
        memory.append({"backend": b, "installed": installed, "usable": usable, "dtype": dt,
                       "weights": est.weights, "state": est.state, "work": est.work, "total": est.total,
                       "fits": None if avail is None else est.total <= avail})
    data = {
        "model": name,
        "format": fmt_backend or "official",
        "config": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_nextn_predict_layers", "num_attention_heads",
            "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "sliding_window",
            "index_n_heads", "index_topk", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "expert_dtype", "hc_mult", "max_position_embeddings", "encoding")},
        "layers": [{"kind": k, "compression": c, "layers": ls, "count": n} for k, c, ls, n in layer_rows(cfg)],
        "parameters": counts,
        "weight_bytes": weights,
        "context": ctx,
        "state_bytes": {"bf16": state_bytes(cfg, ctx, "bf16"), "deploy": state_bytes(cfg, ctx, "deploy")},
        "state_bytes_per_token": {"bf16": bytes_per_token(cfg, "bf16"), "deploy": bytes_per_token(cfg, "deploy")},
        "memory": memory,
        "problems": problems,
    }
    if parallel is not None:
        data["parallel"] = parallel_plan(cfg, parallel, ctx)
    return data, error


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(data: dict, console: Console) -> None:
    cfg = data["config"]
    console.print(f"[bold]{data['model']}[/bold]  ({data['format']} layout)", highlight=False)
    t = Table(title="configuration", show_header=False, title_justify="left")
    t.add_column(style="cyan")
    t.add_column()
    for k, v in cfg.items():
        t.add_row(k, str(v))
    console.print(t)

    t = Table(title="layers", title_justify="left")
    for col in ("attention", "compression", "layers", "count"):
        t.add_column(col)
    for row in data["layers"]:
        t.add_row(row["kind"], row["compression"], row["layers"], str(row["count"]))
    console.print(t)

    p = data["parameters"]
    t = Table(title="parameters and weights", title_justify="left")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("parameters (main model)", _count(p["total"]))
    t.add_row("active per token", _count(p["active"]))
    t.add_row("MTP block", _count(p["mtp"]))
    for dt, n in sorted(data["weight_bytes"].items(), key=lambda kv: -kv[1]):
        t.add_row(f"stored {FORMAT_NAMES.get(dt, dt)}", human_bytes(n))
    t.add_row("stored total", human_bytes(sum(data["weight_bytes"].values())))
    console.print(t)

    ctx, sb, per = data["context"], data["state_bytes"], data["state_bytes_per_token"]
    t = Table(title=f"state (KV cache) of one sequence at {ctx} tokens", title_justify="left")
    for col in ("format", "bytes", "per token (asymptotic)"):
        t.add_column(col, justify="right" if col != "format" else "left", no_wrap=True)
    t.add_row("bf16", human_bytes(sb["bf16"]), f"{per['bf16']:,.0f} B")
    t.add_row("deploy (FP8/BF16, FP4 indexer keys)", human_bytes(sb["deploy"]), f"{per['deploy']:,.0f} B")
    console.print(t)

    t = Table(title=f"memory estimate at context {ctx}", title_justify="left")
    for col in ("backend", "dtype", "weights", "state", "work", "total", "fits"):
        t.add_column(col, justify="left" if col in ("backend", "dtype") else "right", no_wrap=True)
    for r in data["memory"]:
        if not r["usable"]:
            continue
        fits = "?" if r["fits"] is None else ("yes" if r["fits"] else "[red]no[/red]")
        name = r["backend"] if r["installed"] else f"{r['backend']} [dim](not installed)[/dim]"
        t.add_row(name, r["dtype"], human_bytes(r["weights"]), human_bytes(r["state"]), human_bytes(r["work"]),
                  human_bytes(r["total"]), fits)
    console.print(t)
    if "parallel" in data:
        render_parallel(data["parallel"], ctx, console)


def render_parallel(p: dict, ctx: int, console: Console) -> None:
    n, c = p["ranks"], p["per_token"]
    t = Table(title=f"per-rank plan for --parallel {n} (stored weight bytes, before loading)",
              show_header=False, title_justify="left")
    t.add_column(style="cyan")
    t.add_column(justify="right")
    t.add_row("weights split across ranks (this rank's part)", human_bytes(p["split_bytes"]))
    t.add_row("weights every rank holds whole", human_bytes(p["replicated_bytes"]))
    t.add_row("weights per rank", human_bytes(p["per_rank_bytes"]))
    t.add_row("weights in one process", human_bytes(p["single_process_bytes"]))
    t.add_row(f"state per rank at {ctx} tokens (deploy format, replicated)", human_bytes(p["state_bytes_per_rank"]))
    t.add_row("collectives per decode token", str(c["collectives"]))
    t.add_row("values all-reduced / all-gathered per token", f"{c['all_reduce_values']:,} / {c['all_gather_values']:,}")
    t.add_row("bytes sent per token per rank (ring, float32)", human_bytes(c["bytes_sent"]))
    console.print(t)


def render_problems(problems: list[str], console: Console) -> None:
    t = Table(title=f"[red]problems ({len(problems)})[/red]", show_header=False, title_justify="left")
    t.add_column(overflow="fold")
    for line in problems[:SHOWN_IN_TABLE]:
        t.add_row(Text(line))
    if len(problems) > SHOWN_IN_TABLE:
        t.add_row(f"… and {len(problems) - SHOWN_IN_TABLE} more (--json lists them all)")
    console.print(t)


Check = Annotated[bool, typer.Option("--check", help="Also scan every weight for NaN/Inf (what loading checks), "
                                                     "without loading.")]


def info(model: opt.Model = None, context: opt.Context = None, check: Check = False,
         parallel: Annotated[Optional[int], typer.Option(
             "--parallel", help="Also print the per-rank memory plan of an N-rank run.")] = None,
         json_out: Annotated[bool, typer.Option("--json", help="Print the same data as one JSON object.")] = False):
    """Configuration, layer kinds, parameter counts, weight and state bytes, memory per backend; what is
    wrong with the checkpoint, if anything (exit 3)."""
    if context is not None and context < 1:
        raise CliError(f"--context must be ≥ 1, got {context}", EXIT_USAGE)
    if parallel is not None and parallel < 1:
        raise CliError(f"--parallel must be at least 1, got {parallel}", EXIT_USAGE)
    data, error = collect(model, context, check, parallel)
    if json_out:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        render(data, console())
        if data["problems"]:
            render_problems(data["problems"], console())
    if error is not None:
        raise error

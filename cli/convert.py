"""`dsv4 convert` (to a backend's ready-to-load layout) and `dsv4 export` (to another runtime's format).

Both only wire the command line to the converters that live with their backends
(`dsv4.backends.mlx.convert.convert`, `dsv4.export.export_onnx`), imported when the command runs so a
missing optional dependency is one line naming the extra to install.  Both show a byte progress bar.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EXIT_BACKEND, EXIT_USAGE, CliError, as_cli_error
from .progress import progress_bar
from .resolve import model_dir, stderr

CONVERT_TARGETS = ("mlx",)
EXPORT_FORMATS = ("onnx",)


def import_tool(module: str, extra: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CliError(f"{what} needs the {extra} extra ({e.name or e} is missing): "
                       f"pip install 'dsv4[{extra}]'", EXIT_BACKEND) from None


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"{out} exists and is not empty; choose another output directory", EXIT_USAGE)


@contextmanager
def tool_errors():
    """The converters report bad input as ValueError/FileExistsError; show those as one line."""
    try:
        yield
    except (ValueError, FileExistsError) as e:
        raise as_cli_error(e) or CliError(str(e).splitlines()[0], EXIT_USAGE) from None


def convert(
    model: Annotated[str, typer.Argument(help="Source checkpoint directory (official layout), or demo|tiny.")],
    out: Annotated[Path, typer.Argument(help="Output directory (created; must be empty).")],
    to: Annotated[str, typer.Option("--to", help=f"Target backend: {'|'.join(CONVERT_TARGETS)}.")] = "mlx",
    bits: Annotated[int, typer.Option("--bits", help="Requantize linear weights to 4 or 8 bits.")] = 8,
    q_mode: Annotated[str, typer.Option("--q-mode", help="Quantization: affine|mxfp4.")] = "mxfp4",
):
    """Convert a checkpoint into a backend's ready-to-load layout (MLX quantized weights)."""
    if to not in CONVERT_TARGETS:
        raise CliError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, got {to!r}", EXIT_USAGE)
    if bits not in (4, 8):
        raise CliError(f"--bits must be 4 or 8, got {bits}", EXIT_USAGE)
    if q_mode not in ("affine", "mxfp4"):
        raise CliError(f"--q-mode must be affine or mxfp4, got {q_mode!r}", EXIT_USAGE)
    tool = import_tool("dsv4.backends.mlx.convert", "mlx", "converting for MLX")
    src = model_dir(model)
    check_out_dir(out)
    with tool_errors(), progress_bar(f"converting {src.name} for {to}", stderr) as progress:
        done = tool.convert(src, out, bits=bits, q_mode=q_mode, progress=progress)
    stderr.print(f"wrote {done}; run it with: dsv4 chat --model {done}", highlight=False)


def export(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=f"Export format: {'|'.join(EXPORT_FORMATS)}.")],
    model: Annotated[str, typer.Argument(help="Source checkpoint directory, or demo|tiny.")],
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    dtype: Annotated[str, typer.Option("--dtype", help="Weight and compute dtype of the export.")] = "float32",
    context: Annotated[Optional[int], typer.Option("--context", "-c", help="State capacity in tokens.")] = None,
    no_mtp: Annotated[bool, typer.Option("--no-mtp", help="Leave out the MTP block.")] = False,
):
    """Export a checkpoint to another runtime's format (ONNX graphs + external weights)."""
    if fmt not in EXPORT_FORMATS:
        raise CliError(f"FORMAT must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}", EXIT_USAGE)
    if context is not None and context < 1:
        raise CliError(f"--context must be ≥ 1, got {context}", EXIT_USAGE)
    tool = import_tool("dsv4.export", "onnx", "exporting to ONNX")
    src = model_dir(model)
    check_out_dir(out)
    with tool_errors(), progress_bar(f"exporting {src.name} to {fmt}", stderr) as progress:
        done = tool.export_onnx(src, out, dtype=dtype, context=context, mtp=not no_mtp, progress=progress)
    stderr.print(f"wrote {done}; run it with: dsv4 chat --model {done} --backend onnx", highlight=False)

"""`dsv4 convert` (to a backend's ready-to-load layout) and `dsv4 export` (to another runtime's format).

Both only wire the command line to the converters that live with their backends
(`dsv4.backends.mlx.convert.convert`, `dsv4.export.export_onnx`), imported when the command runs so a
missing optional dependency is one line naming the extra to install.  Both show a byte progress bar.
"""

from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..portable.install import install_command
from .console import console
from .errors import EXIT_BACKEND, EXIT_USAGE, CliError, as_cli_error
from .progress import progress_bar
from .resolve import model_dir

CONVERT_TARGETS = ("mlx",)
EXPORT_FORMATS = ("onnx",)


def import_tool(module: str, extra: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CliError(f"{what} needs the {extra} extra ({e.name or e} is missing): "
                       f"{install_command(extra)}", EXIT_BACKEND) from None


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


def weight_forms(layouts: dict) -> str:
    """`experts mxfp4, other linears mxfp8`: the forms a converted directory holds (from the mode and
    bits its config records for each quantized linear)."""
    forms: dict = {}
    for name, (mode, bits) in layouts.items():
        role = "experts" if ".ffn.experts." in name else "other linears"
        forms.setdefault(role, set()).add(mode if mode.startswith("mx") else f"{mode} {bits}-bit")
    return ", ".join(f"{role} {'+'.join(sorted(f))}" for role, f in sorted(forms.items()))


def convert(
    model: Annotated[str, typer.Argument(help="Source checkpoint directory (official layout), or demo|tiny.")],
    out: Annotated[Path, typer.Argument(help="Output directory (created; must be empty).")],
    to: Annotated[str, typer.Option("--to", help=f"Target backend: {'|'.join(CONVERT_TARGETS)}.")] = "mlx",
    bits: Annotated[int, typer.Option("--bits", help=(
        "With --q-mode mxfp4: 8 keeps the FP8 weights lossless as mxfp8, 4 requantizes them to mxfp4 "
        "(FP4 experts stay mxfp4 either way). With affine: the bits of every weight."))] = 8,
    q_mode: Annotated[str, typer.Option("--q-mode", help=(
        "mxfp4: the checkpoint's own micro-scaled formats; affine: requantize every weight to affine "
        "--bits with groups of 32."))] = "mxfp4",
):
    """Convert a checkpoint into MLX's ready-to-load layout. The default is lossless and mixes two
    formats: the FP4 experts stay mxfp4, the FP8 weights become mxfp8."""
    if to not in CONVERT_TARGETS:
        raise CliError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, got {to!r}", EXIT_USAGE)
    if bits not in (4, 8):
        raise CliError(f"--bits must be 4 or 8, got {bits}", EXIT_USAGE)
    if q_mode not in ("affine", "mxfp4"):
        raise CliError(f"--q-mode must be affine or mxfp4, got {q_mode!r}", EXIT_USAGE)
    tool = import_tool("dsv4.backends.mlx.convert", "mlx", "converting for MLX")
    src = model_dir(model)
    check_out_dir(out)
    err = console(stderr=True)
    with tool_errors(), progress_bar(f"converting {src.name} for {to}", err) as progress:
        done = tool.convert(src, out, bits=bits, q_mode=q_mode, progress=progress)
    layouts = json.loads((done / "config.json").read_text())[tool.FORMAT_KEY]["tensors"]
    err.print(f"wrote {done} ({weight_forms(layouts)}); run it with: dsv4 chat --model {done}", markup=False)


def export(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=f"Export format: {'|'.join(EXPORT_FORMATS)}.")],
    model: Annotated[str, typer.Argument(help="Source checkpoint directory, or demo|tiny.")],
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    weights: Annotated[str, typer.Option("--weights", help=(
        "quantized: the checkpoint's FP8/FP4 bytes, decoded in the graph (its size; float32 compute). "
        "float32|float16|bfloat16: dense weights in that dtype (2-8x larger; half-precision ones also "
        "round activations)."))] = "quantized",
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
    err = console(stderr=True)
    with tool_errors(), progress_bar(f"exporting {src.name} to {fmt}", err) as progress:
        done = tool.export_onnx(src, out, weights=weights, context=context, mtp=not no_mtp, progress=progress)
    size = (done / "model.onnx.data").stat().st_size
    err.print(f"wrote {done} ({weights} weights, {size / 2 ** 30:.2f} GiB); run it with: dsv4 chat --model {done} "
              f"--backend onnx", markup=False)

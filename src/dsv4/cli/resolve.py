"""From `--model/--backend/--dtype/--context/--force` to a loaded `Model` (shared by every command and the
server).

Steps, each with a one-line error when it cannot proceed:
1. `model_dir`: a model directory (official layout, a backend's converted directory, or an ONNX export,
   told apart by `portable.layout`), a Hugging Face repo id (`portable.hub`: the HF cache, else a
   download), or a built-in preset put once into the user cache (`demo`: the shipped tiny V4 trained on
   arithmetic, unpacked; `demo-random`: the V4 architecture at tiny sizes with the real tokenizer and
   random weights; `tiny`/`tiny2`: the test checkpoints; the random ones built with a progress bar).
2. `pick_backend`: `auto` follows the directory (converted for MLX → mlx, an ONNX export → onnx), then
   the hardware (MLX on Apple silicon, CUDA when a GPU is visible), then the fastest installed CPU
   backend: `cpu` (stored-format kernels, `benchmarks/cpu.py`), then the NumPy reference, then MLX on
   the CPU (its CPU kernels are slow); never torch on the CPU.
3. `estimate_memory` / `check_memory`: weights (as the backend holds them) + state at the context +
   working buffers, against the memory available to that backend; refuse with the numbers unless
   `--force`.  `DSV4_MEMORY_LIMIT` (e.g. `8G`) overrides the detected amount.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass, replace
from pathlib import Path


from ..portable import cache
from ..portable.config import PRESETS, ModelConfig, preset
from ..portable.layout import MANIFEST, backend_of, is_export
from ..portable.runtime import (SYNTHETIC, BackendError, ContextError, backend_names, context_for,
                                default_state_format, get_backend, resolve_path)
from .console import console
from .errors import EXIT_BACKEND, EXIT_MEMORY, EXIT_MODEL, EXIT_USAGE, CliError, as_cli_error
from .progress import progress_bar

DEFAULT_MODEL = "demo"
DEFAULT_CONTEXT = 4096
BACKEND_CHOICES = ("auto", *backend_names())
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float64")
CPU_PREFERENCE = ("cpu", "reference", "mlx")   # never cuda: torch on the CPU is the slowest here
THREADED = ("cpu", "onnx")                      # backends whose runner takes `threads`
DEMO_NOTICE = ("note: the demo model is a tiny DeepSeek V4 trained on integer arithmetic only (A + B and A - B up "
               "to 99, A times B up to 12: try \"What is 37 + 45?\"); pass --model DIR for a real checkpoint")
RANDOM_DEMO_NOTICE = ("note: the demo-random model has random weights (the V4 architecture at tiny sizes with the "
                      "real tokenizer), so its text is gibberish; pass --model DIR for a real checkpoint")
DEMO_CHAT = ("the demo answers A + B and A - B for A, B up to 99 and A times B up to 12, in several phrasings "
             "(What is 37 + 45? / Compute 12-30. / 7 times 8?); /mode thinking shows its worked reasoning, and "
             "`dsv4 serve` lets it call a calculator tool")
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2}



# ---------------------------------------------------------------------------------------------- model
def model_dir(spec: str | None) -> Path:
    """The model directory for `--model`: a directory (checked by `layout.backend_of`), a synthetic preset
    (built on first use, with a progress bar) or a Hugging Face repo id (`runtime.resolve_path`)."""
    spec = spec or DEFAULT_MODEL
    p = Path(spec).expanduser()
    if p.exists() and not p.is_dir():
        raise CliError(f"{spec} is a file; pass the checkpoint's directory", EXIT_MODEL)
    if not p.exists() and spec in SYNTHETIC:
        return build_synthetic(spec)
    if not p.exists() and spec in PRESETS:
        raise CliError(f"the {spec!r} preset has no weights on this machine; pass the directory of a "
                       f"downloaded DeepSeek-V4 checkpoint or its Hugging Face repo id (dsv4 info --model "
                       f"{spec} works without one)", EXIT_MODEL)
    try:
        path = resolve_path(spec)
        backend_of(path)
    except FileNotFoundError as e:            # not found, not a model directory, not on the Hub
        raise CliError(str(e), EXIT_MODEL) from None
    return path


def is_demo(cfg: ModelConfig, name: str = "demo") -> bool:
    """The config of preset `name` (the trained demo, or demo-random): the model itself, or a conversion or
    export of it (an export may lower max_position_embeddings).  No real checkpoint has these sizes."""
    demo = preset(name)
    return replace(cfg, max_position_embeddings=demo.max_position_embeddings) == demo


def demo_notice(cfg: ModelConfig) -> str | None:
    """The stderr note for a demo model (what it can do, or that its weights are random); None otherwise."""
    return DEMO_NOTICE if is_demo(cfg) else RANDOM_DEMO_NOTICE if is_demo(cfg, "demo-random") else None


def build_synthetic(name: str) -> Path:
    """`ensure_tiny(name)` with a progress bar on stderr while it builds (only the first time)."""
    from ..portable.tiny import ensure_tiny
    err = console(stderr=True)
    with progress_bar(f"building the {name} model (once)", err, units="count", transient=True) as progress:
        return ensure_tiny(name, progress=progress)


def model_config(path: Path) -> ModelConfig:
    return ModelConfig.from_file(path)


# -------------------------------------------------------------------------------------------- backend
def backend_available(name: str) -> bool:
    try:
        get_backend(name)
    except BackendError:
        return False
    return True


def gpu_visible() -> bool:
    """A CUDA GPU is visible (checked without importing torch when no NVIDIA driver is present)."""
    if not (Path("/proc/driver/nvidia/version").exists() or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def pick_backend(name: str, path: Path) -> str:
    """The concrete backend for `--backend` (validated: unknown or missing ones raise BackendError)."""
    if name not in BACKEND_CHOICES:
        raise CliError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}", EXIT_BACKEND)
    own = backend_of(path)
    if name != "auto":
        if own is not None and own != name:
            raise CliError(f"{path} was converted for the {own} backend; use --backend {own} "
                           f"(or --backend auto)", EXIT_BACKEND)
        get_backend(name)
        if name == "cuda" and not gpu_visible():
            console(stderr=True).print("warning: no CUDA GPU is visible, so the cuda backend runs torch on the "
                                       "CPU (slow); --backend auto picks the fastest backend here",
                                       style="yellow", markup=False, soft_wrap=True)
        return name
    if own is not None:
        get_backend(own)
        return own
    if apple_silicon() and backend_available("mlx"):
        return "mlx"
    if gpu_visible() and backend_available("cuda"):
        return "cuda"
    return next(b for b in CPU_PREFERENCE if backend_available(b))


def pick_dtype(dtype: str, backend: str) -> str:
    if dtype not in DTYPE_CHOICES:
        raise CliError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}", EXIT_USAGE)
    if dtype != "auto":
        return dtype
    return "bfloat16" if backend == "mlx" and apple_silicon() else "float32"


# --------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    state: int
    work: int

    @property
    def total(self) -> int:
        return self.weights + self.state + self.work


def state_buffer_bytes(cfg: ModelConfig, context: int, dtype: str, fmt: str = "bf16") -> int:
    """Bytes of one sequence's state once it holds `context` tokens (states grow with the text; this is
    the most a sequence can reach, which is what a memory check must allow for)."""
    act = _ITEMSIZE[dtype]
    hp = 8 if dtype == "float64" else 4
    size = {"act": act, "hp": hp, "int": 8, "u8": 1}
    return sum(math.prod(b.shape) * size[b.kind] for b in cache.state_spec(cfg, 1, context, fmt))


def estimate_memory(cfg: ModelConfig, path: Path | None, backend: str, dtype: str, context: int,
                    prefill_chunk: int = 256) -> MemoryEstimate:
    """What loading `path` on `backend` will take.  Weights: as the backend declares it holds each role of
    the checkpoint schema (`backends.catalog`; a registered backend without a declaration is counted as
    holding the stored bytes), or for an ONNX export the size of its data file.  Work: logits and
    activations of one prefill chunk plus a fixed runtime overhead."""
    from ..backends.catalog import HOLDINGS, UNDECLARED
    from ..portable.weights import held_bytes
    holding = HOLDINGS.get(backend, UNDECLARED)
    if path is not None and is_export(path):
        manifest = json.loads((path / MANIFEST).read_text())
        weights = int(manifest.get("data", {}).get("bytes", 0)) or held_bytes(cfg, holding, dtype)
    else:
        weights = held_bytes(cfg, holding, dtype)
    work = prefill_chunk * (cfg.vocab_size + 32 * cfg.hidden_size * cfg.hc_mult) * 4 + (300 << 20)
    fmt = default_state_format(backend, dtype, cfg)
    return MemoryEstimate(weights, state_buffer_bytes(cfg, context, dtype, fmt), work)


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        return int(float(t[:len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise CliError(f"DSV4_MEMORY_LIMIT must be a size like 8G or 512M, got {text!r}", EXIT_USAGE) from None


def available_memory(backend: str) -> tuple[int | None, str]:
    """(bytes available to `backend`, where that number comes from); None when it cannot be told."""
    limit = os.environ.get("DSV4_MEMORY_LIMIT")
    if limit:
        return parse_bytes(limit), "DSV4_MEMORY_LIMIT"
    if backend == "cuda" and gpu_visible():
        import torch
        return int(torch.cuda.mem_get_info()[0]), "free GPU memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(est: MemoryEstimate, backend: str, force: bool) -> None:
    avail, source = available_memory(backend)
    if avail is None or est.total <= avail or force:
        return
    raise CliError(f"not enough memory: the {backend} backend needs about {human_bytes(est.total)} "
                   f"(weights {human_bytes(est.weights)} + state {human_bytes(est.state)} + work "
                   f"{human_bytes(est.work)}) but {human_bytes(avail)} is free ({source}); "
                   f"lower --context, pick another --backend, or pass --force", EXIT_MEMORY)


# ----------------------------------------------------------------------------------------------- load
def resolve_context(cfg: ModelConfig, context: int | None) -> int:
    """`--context`, or DEFAULT_CONTEXT capped at the model's limit: `dsv4.load`'s rule (`context_for`), so
    a context beyond the limit is refused with the same words."""
    try:
        return context_for(cfg, context, default=DEFAULT_CONTEXT)
    except ContextError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def load_model(model: str | None, backend: str = "auto", dtype: str = "auto", context: int | None = None,
               force: bool = False, quiet: bool = False, parallel: int | None = None, threads: int | None = None):
    """Resolve, check memory and load; prints the demo notice (unless `quiet`) and, while a backend reads
    its weights into its own memory, a progress bar on stderr.  `parallel` N > 1 (or a launcher's ranks)
    loads this process as rank 0 of N (`cli.parallel`).  `threads` bounds the CPU threads of the backends
    that take it (cpu, onnx); the others use their libraries' own settings."""
    import dsv4
    from .parallel import launched_world, load_parallel
    path = model_dir(model)
    cfg = model_config(path)
    name = pick_backend(backend, path)
    dt = pick_dtype(dtype, name)
    ctx = resolve_context(cfg, context)
    if parallel is not None and parallel < 1:
        raise CliError(f"--parallel must be at least 1, got {parallel}", EXIT_USAGE)
    if threads is not None and threads < 1:
        raise CliError(f"--threads must be at least 1, got {threads}", EXIT_USAGE)
    options = {"threads": threads} if threads and name in THREADED else {}
    launched = launched_world()
    world = launched[1] if launched else (parallel or 1)
    est = estimate_memory(cfg, path, name, dt, ctx)
    if world > 1:
        from ..portable.sharding import ShardingError, memory_plan
        try:
            plan = memory_plan(cfg, world)
        except ShardingError as e:
            raise CliError(str(e), EXIT_USAGE) from None
        ranks_here = 1 if launched else world             # local ranks share this machine's memory
        est = MemoryEstimate(int(est.weights * plan.per_rank / plan.total) * ranks_here,
                             est.state * ranks_here, est.work * ranks_here)
    check_memory(est, name, force)
    err = console(stderr=True)
    if demo_notice(cfg) and not quiet:
        err.print(demo_notice(cfg), style="yellow", soft_wrap=True)
    with progress_bar(f"loading {path.name} on {name} ({dt})", err, transient=True) as progress:
        try:
            if world > 1:
                return load_parallel(path, name, dt, ctx, parallel, progress)
            return dsv4.load(path, backend=name, dtype=dt, context=ctx, progress=progress, **options)
        except ValueError as e:               # also a dtype the backend lacks, an unreadable converted dir…
            raise as_cli_error(e) or CliError(str(e).splitlines()[0], EXIT_USAGE) from None

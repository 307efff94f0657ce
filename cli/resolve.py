"""From `--model/--backend/--dtype/--context/--force` to a loaded `Model` (shared by every command and the
server).

Steps, each with a one-line error when it cannot proceed:
1. `model_dir`: a checkpoint directory (official layout, a backend's converted directory, or an ONNX
   export), or a synthetic preset built once into the user cache (`demo`: the V4 architecture at tiny
   sizes with the real tokenizer; `tiny`/`tiny2`: the test checkpoints) with a progress bar.
2. `pick_backend`: `auto` follows the directory (converted for MLX → mlx, an ONNX export → onnx), then
   the hardware (MLX on Apple silicon, CUDA when a GPU is visible), then the fastest installed CPU
   backend.  On this project's CPU runs the NumPy reference decodes the tiny/demo models fastest
   (≈45 ms/token vs ≈130 ms for MLX-on-CPU and slower for torch-on-CPU, see `dsv4 bench`), so it leads
   the CPU list.
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
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..portable import cache
from ..portable.config import PRESETS, ModelConfig
from ..portable.runtime import BackendError, backend_names, default_state_format, get_backend
from .errors import EXIT_BACKEND, EXIT_MEMORY, EXIT_MODEL, EXIT_USAGE, CliError, as_cli_error
from .progress import progress_bar

DEFAULT_MODEL = "demo"
SYNTHETIC = ("demo", "tiny", "tiny2")
DEFAULT_CONTEXT = 4096
BACKEND_CHOICES = ("auto", *backend_names())
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float64")
CPU_PREFERENCE = ("reference", "mlx", "cuda")
ONNX_MANIFEST = "manifest.json"
DEMO_NOTICE = ("note: the demo model has random weights (the V4 architecture at tiny sizes with the real "
               "tokenizer), so its text is gibberish; pass --model DIR for a real checkpoint")
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2}

stderr = Console(stderr=True, highlight=False)


# ---------------------------------------------------------------------------------------------- model
def model_dir(spec: str | None) -> Path:
    """The checkpoint directory for `--model` (building a synthetic preset on first use)."""
    spec = spec or DEFAULT_MODEL
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CliError(f"{p} has no config.json; --model needs a checkpoint directory "
                           f"(config.json + *.safetensors + tokenizer.json)", EXIT_MODEL)
        return p
    if p.exists():
        raise CliError(f"--model {spec} is a file; pass the checkpoint's directory", EXIT_MODEL)
    if spec in SYNTHETIC:
        return build_synthetic(spec)
    if spec in PRESETS:
        raise CliError(f"the {spec!r} preset has no weights on this machine; pass the directory of a "
                       f"downloaded DeepSeek-V4 checkpoint (dsv4 info --model {spec} works without one)",
                       EXIT_MODEL)
    raise CliError(f"model directory not found: {spec} (pass a checkpoint directory, or --model demo)",
                   EXIT_MODEL)


def build_synthetic(name: str) -> Path:
    """`ensure_tiny(name)` with a progress bar on stderr while it builds (only the first time)."""
    from ..portable.tiny import ensure_tiny
    with progress_bar(f"building the {name} model (once)", stderr, units="count", transient=True) as progress:
        return ensure_tiny(name, progress=progress)


def model_config(path: Path) -> ModelConfig:
    return ModelConfig.from_file(path)


def converted_backend(path: Path) -> str | None:
    """The backend a directory was converted or exported for (None: the official layout)."""
    if (path / ONNX_MANIFEST).is_file():
        return "onnx"
    try:
        fmt = json.loads((path / "config.json").read_text()).get("dsv4_format")
    except (OSError, ValueError):
        return None
    return fmt.get("backend") if isinstance(fmt, dict) else None


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
    own = converted_backend(path)
    if name != "auto":
        if own is not None and own != name:
            raise CliError(f"{path} was converted for the {own} backend; use --backend {own} "
                           f"(or --backend auto)", EXIT_BACKEND)
        get_backend(name)
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


def weight_bytes_by_dtype(cfg: ModelConfig, path: Path | None) -> dict:
    """Stored bytes per safetensors dtype: from the checkpoint's headers, or the schema without one."""
    from ..portable.checkpoint import Checkpoint, schema
    specs = schema(cfg)
    if path is not None and converted_backend(path) != "onnx":
        try:
            ckpt = Checkpoint(path)
            specs = [ckpt.spec(n) for n in ckpt.names()]
        except (OSError, ValueError):
            pass
    out: dict = {}
    for s in specs:
        out[s.dtype] = out.get(s.dtype, 0) + s.nbytes
    return out


def _plain_and_dense_elements(cfg: ModelConfig) -> tuple[int, int]:
    """(elements of unquantized tensors, elements of quantized weights once dense) of the schema."""
    from ..portable.checkpoint import schema
    specs = schema(cfg)
    scaled = {s.name[:-6] for s in specs if s.name.endswith(".scale")}
    plain = dense = 0
    for s in specs:
        n = math.prod(s.shape)
        if s.name.endswith(".scale") or s.dtype == "I64":
            continue
        if s.name.endswith(".weight") and s.name[:-7] in scaled:
            dense += n * (2 if s.dtype == "I8" else 1)
        else:
            plain += n
    return plain, dense


def state_buffer_bytes(cfg: ModelConfig, context: int, dtype: str, fmt: str = "bf16") -> int:
    """Bytes of one sequence's state once it holds `context` tokens (states grow with the text; this is
    the most a sequence can reach, which is what a memory check must allow for)."""
    act = _ITEMSIZE[dtype]
    hp = 8 if dtype == "float64" else 4
    size = {"act": act, "hp": hp, "int": 8, "u8": 1}
    return sum(math.prod(b.shape) * size[b.kind] for b in cache.state_spec(cfg, 1, context, fmt))


def estimate_memory(cfg: ModelConfig, path: Path | None, backend: str, dtype: str, context: int,
                    prefill_chunk: int = 256) -> MemoryEstimate:
    """What loading `path` on `backend` will take.  Weights: the reference maps the stored tensors and
    decodes the plain ones (and up to 1 GiB of dense copies) to its dtype; MLX/CUDA keep quantized
    weights quantized; an ONNX export holds its data file (every weight dense in the export dtype).  Work: logits and activations of one
    prefill chunk plus a fixed runtime overhead."""
    item = _ITEMSIZE[dtype]
    stored = sum(weight_bytes_by_dtype(cfg, path).values())
    plain, dense = _plain_and_dense_elements(cfg)
    if backend == "onnx" and path is not None and (path / ONNX_MANIFEST).is_file():
        manifest = json.loads((path / ONNX_MANIFEST).read_text())
        weights = int(manifest.get("data", {}).get("bytes", stored))
    elif backend == "onnx":                   # what an export in `dtype` will hold: every weight dense
        weights = (plain + dense) * item
    elif backend == "reference":
        weights = stored + plain * max(item, 4) + min(1 << 30, dense * max(item, 4))
    else:
        weights = stored + plain * item
    work = prefill_chunk * (cfg.vocab_size + 32 * cfg.hidden_size * cfg.hc_mult) * 4 + (300 << 20)
    fmt = default_state_format(backend, dtype)
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
    if context is None:
        return min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
    if not 1 <= context <= cfg.max_position_embeddings:
        raise CliError(f"--context must be in 1..{cfg.max_position_embeddings} for this model, got {context}",
                       EXIT_USAGE)
    return context


def load_model(model: str | None, backend: str = "auto", dtype: str = "auto", context: int | None = None,
               force: bool = False, quiet: bool = False):
    """Resolve, check memory and load; prints the demo notice (unless `quiet`) and, while a backend reads
    its weights into its own memory, a progress bar on stderr."""
    import dsv4
    path = model_dir(model)
    cfg = model_config(path)
    name = pick_backend(backend, path)
    dt = pick_dtype(dtype, name)
    ctx = resolve_context(cfg, context)
    check_memory(estimate_memory(cfg, path, name, dt, ctx), name, force)
    if (model or DEFAULT_MODEL) == "demo" and not quiet:
        stderr.print(DEMO_NOTICE, style="yellow", soft_wrap=True)
    with progress_bar(f"loading {path.name} on {name} ({dt})", stderr, transient=True) as progress:
        try:
            return dsv4.load(path, backend=name, dtype=dt, context=ctx, progress=progress)
        except ValueError as e:               # also a dtype the backend lacks, an unreadable converted dir…
            raise as_cli_error(e) or CliError(str(e).splitlines()[0], EXIT_USAGE) from None

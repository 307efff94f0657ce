"""Backend registry, the `Model` object behind `dsv4.load`, and the default graph runner.

Why a registry: `portable` must not import a backend, yet `dsv4.load(path, backend="mlx")` has to find
one.  Each backend module calls `register_backend(name, make_runner)` when imported, with
`make_runner(cfg, ckpt, dtype=..., emulate=..., ...)` taking a `Checkpoint` (or, declared with
`reads_checkpoint=False`, the model directory: an ONNX export holds no safetensors); the registry knows
only the module paths of the built-in ones and imports them lazily, so a missing optional dependency
becomes a one-line error naming the extra to install.

A runner is the one thing a backend must provide: `new_state(batch)`, `step(state, ids) -> (logits,
streams)` on NumPy int ids / float32 logits, updating the state in place, `mtp_step(...)`, `fork(state)`
and `stack`/`split` for batching.  `GraphRunner` is the eager implementation over any `Ops`; backends may
wrap it (compiled steps per capacity bucket, CUDA graphs) or replace it (an ONNX session).

States follow the text, not the context (`portable.cache`): a new state holds the smallest capacity
bucket, `step` grows it before a chunk that would overflow it, and `context` is only the limit.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from . import cache, graph, hub
from .config import ModelConfig, PRESETS
from .layout import backend_of
from .weights import live_rows

_BUILTIN = {"reference": "dsv4.portable.reference", "cpu": "dsv4.backends.cpu", "mlx": "dsv4.backends.mlx",
            "cuda": "dsv4.backends.cuda", "onnx": "dsv4.backends.onnx"}
_FACTORIES: dict = {}
_READS_DIRECTORY: set = set()          # backends whose make_runner takes the model directory
SYNTHETIC = ("demo", "demo-random", "tiny", "tiny2")   # presets `portable.tiny` puts in the cache (the
                                                       # shipped demo unpacked, the others random weights)
DEFAULT_CONTEXT = 16384


class BackendError(RuntimeError):
    """An unknown or unavailable backend; the message says what to install."""


def register_backend(name: str, make_runner, reads_checkpoint: bool = True) -> None:
    """Make `name` loadable: `make_runner(cfg, ckpt, **options)` gets a `Checkpoint`, or the model
    directory when `reads_checkpoint` is False."""
    _FACTORIES[name] = make_runner
    (_READS_DIRECTORY.discard if reads_checkpoint else _READS_DIRECTORY.add)(name)


def backend_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_FACTORIES))


def get_backend(name: str):
    if name not in _FACTORIES:
        if name not in _BUILTIN:
            raise BackendError(f"unknown backend {name!r}; available: {', '.join(backend_names())}")
        try:
            mod = importlib.import_module(_BUILTIN[name])
        except ImportError as e:
            from .install import install_command
            raise BackendError(f"backend {name!r} is not installed ({e.name or e} is missing); "
                               f"install it with: {install_command(name)}") from None
        if name not in _FACTORIES:
            raise BackendError(f"backend module {mod.__name__} did not register the backend {name!r}")
    return _FACTORIES[name]


class StateRunner:
    """What every runner does with its states through the `Ops` that stores them (`self.ops`)."""

    state_format = "bf16"           # how compressed entries are stored (`portable.cache`)

    def position(self, state) -> int:
        """Tokens already in `state` (the longest sequence of the batch)."""
        return int(np.max(self.ops.to_numpy(state["start"])))

    def settle(self, arrays: list) -> None:
        """Compute `arrays` now (lazy backends): saved rows must not keep an old buffer alive."""

    def set_start(self, state, start: np.ndarray) -> None:
        """Set the tokens held per row (a rollback, `portable.speculative`); runners whose captured steps
        bind the `start` buffer itself write it in place instead."""
        state.start = self.ops.asarray(np.asarray(start, dtype=np.int64), "int")

    def fork(self, state: cache.State) -> cache.State:
        return state.fork(self.ops)

    def stack(self, states: list) -> cache.State:
        return cache.stack(self.ops, states)

    def split(self, state: cache.State) -> list:
        return cache.split(self.ops, state)

    def state_to_numpy(self, state) -> dict:
        """Host copies of every buffer (copies: the state changes in place), bf16 words as float32."""
        return {k: np.array(self.ops.to_numpy(self.ops.read(v)), copy=True) for k, v in state.items()}

    def state_from_numpy(self, arrays: dict, capacity: int) -> cache.State:
        """The inverse of `state_to_numpy`: a state of `capacity` tokens in this runner's format from host
        copies of its buffers.  Each buffer is written through `Ops.write_rows`, which stores values as a
        step does (bf16 words, FP8/FP4 code bytes), so the round trip is exact; a missing buffer or one
        of the wrong shape is a ValueError."""
        o, bufs = self.ops, {}
        start = arrays.get("start")
        if start is None or np.ndim(start) != 1:
            raise ValueError("state buffer start: expected shape (batch,), missing")
        for b in cache.state_spec(self.cfg, len(start), capacity, self.state_format):
            a = arrays.get(b.name)
            if a is None or tuple(a.shape) != tuple(b.shape):
                got = "missing" if a is None else f"shape {tuple(a.shape)}"
                raise ValueError(f"state buffer {b.name}: expected shape {tuple(b.shape)}, {got}")
            if b.kind == "int":
                bufs[b.name] = o.asarray(a, "int")
                continue
            rows = np.repeat(np.arange(b.shape[1])[None], b.shape[0], 0)
            bufs[b.name] = o.write_rows(o.state_buffer(b.shape, b.kind), o.asarray(rows, "int"), o.asarray(a))
        return cache.State(self.cfg, bufs, capacity, self.state_format)


class GraphRunner(StateRunner):
    """Runs `portable.graph` eagerly on an `Ops` instance with a weight store."""

    def __init__(self, cfg: ModelConfig, ops, weights, state_format: str = "bf16"):
        cache.check_format(state_format)
        self.cfg, self.ops, self.weights, self.state_format = cfg, ops, weights, state_format
        self.limit: int | None = None          # the model's context (set by `Model`): the largest capacity
        self._live = None                      # (live head ids, `graph.HeadRows`), found on first use

    def new_state(self, batch: int, capacity: int = 0) -> cache.State:
        return cache.State.new(self.ops, self.cfg, batch, cache.capacity_for(capacity, self.limit),
                               self.state_format)

    def new_mtp_state(self, batch: int, capacity: int = 0) -> cache.State:
        return cache.State.new(self.ops, self.cfg, batch, cache.capacity_for(capacity, self.limit),
                               self.state_format, mtp=True)

    def reserve(self, state: cache.State, n: int) -> None:
        """Grow `state` so n more tokens fit (a copy of the rows held, only at a bucket boundary)."""
        state.reserve(self.ops, self.position(state) + n, self.limit)

    def step(self, state: cache.State, ids: np.ndarray):
        o = self.ops
        self.reserve(state, ids.shape[1])
        logits, streams = graph.forward(o, self.weights, self.cfg, state, o.asarray(ids, "int"), self.live_head)
        return np.asarray(o.to_numpy(logits)), streams

    @property
    def live_head(self) -> graph.HeadRows | None:
        """The head rows that are not all zeros, with their ids (`graph.HeadRows`), or None when every row
        is live or in a parallel run (a rank holds one vocabulary part).  Found once, from the loaded head
        (call it before tracing or capturing a step: it reads the head back to the host)."""
        if self._live is None:
            o, ids = self.ops, None
            if o.world == 1:
                head = self.weights["head.weight"]
                ids = live_rows(o.to_numpy(o.row_absmax(head)))
            self._live = (ids, None if ids is None else graph.HeadRows.of(o, head, ids))
        return self._live[1]

    @property
    def draft_vocab(self):
        """The ids a draft is scored over (`mtp_step(..., draft=True)`), sorted, or None for all of them:
        those of `live_head`.  A draft needs no logit for an id the head cannot favour, and any draft
        distribution keeps speculative decoding exact (`portable.speculative`), so this only saves cost."""
        self.live_head
        return self._live[0]

    def mtp_step(self, state: cache.State, streams, ids_next: np.ndarray, with_streams: bool = False,
                 draft: bool = False):
        """MTP logits for main `streams` [B,S,hc,D] and next ids [B,S]; with `with_streams`, (logits, the
        block's output streams) for drafting again from them; with `draft`, logits of the `draft_vocab`
        ids only (all of them when it is None)."""
        o = self.ops
        self.reserve(state, ids_next.shape[1])
        out = graph.mtp_forward(o, self.weights, self.cfg, state, streams, o.asarray(ids_next, "int"),
                                with_streams, self.live_head, draft)
        logits, h = out if with_streams else (out, None)
        logits = np.asarray(o.to_numpy(logits))
        return (logits, h) if with_streams else logits

class ContextError(ValueError):
    """Input longer than the context this model was loaded with."""


class NonFiniteError(RuntimeError):
    """A step produced NaN or Inf logits: the model (its weights or config) is broken, not the caller's input."""


def quiet_numerics():
    """NumPy's floating-point warnings off while a backend runs a step: a broken model would print one per
    op, and `Model.check_finite` reports their consequence once, in one line."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


class Model:
    """A loaded V4 model on one backend.  Stateless calls (`forward`) and stateful ones (`step`) share one
    runner; generation runs on `portable.engine` and is reached through `generate`/`stream`/`generate_batch`."""

    def __init__(self, cfg: ModelConfig, runner, path: Path | None, backend: str, dtype: str, context: int):
        self.config, self.runner, self.path = cfg, runner, path
        self.backend, self.dtype, self.context = backend, dtype, context
        runner.limit = context
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .encoding.tokenizer import model_tokenizer
            self._tokenizer = model_tokenizer(self.path, self.config.vocab_size)
        return self._tokenizer

    def check_length(self, n: int) -> None:
        if n > self.context:
            raise ContextError(f"{n} tokens exceed this model's context of {self.context} tokens "
                               f"(load with a larger context=, at most {self.config.max_position_embeddings})")

    def check_ids(self, ids) -> np.ndarray:
        """ids as int64, refused (one line) when an id is outside the model's vocabulary: a backend would
        index past its embedding (MLX does not bounds-check gathers)."""
        ids = np.asarray(ids, dtype=np.int64)
        v = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= v):
            bad = int(ids[(ids < 0) | (ids >= v)].flat[0])
            raise ValueError(f"token id {bad} is outside this model's vocabulary of {v} ids (0..{v - 1})")
        return ids

    def check_finite(self, logits: np.ndarray) -> np.ndarray:
        """`logits`, refused (one line) when any is NaN or Inf: sampling from them would give garbage
        silently.  One reduction over what the step produced; the weights' values themselves are scanned
        at load (`Checkpoint.validate`) and by `dsv4 info --check`."""
        if not np.isfinite(logits).all():
            where = f" --model {self.path}" if self.path is not None else ""
            raise NonFiniteError(f"the model produced NaN or Inf logits: its weights or the numbers in its "
                                 f"config.json are broken; scan the weights with: dsv4 info --check{where}")
        return logits

    def new_state(self, batch: int = 1):
        """A fresh state holding no tokens; its memory grows with the tokens fed, up to `context`."""
        return self.runner.new_state(batch)

    def step(self, state, ids, with_streams: bool = False):
        """Feed ids [B,S] to `state`, which is updated in place (it is also returned, so `logits, state =
        model.step(state, ids)` reads naturally); returns (logits [B,S,V] float32, state), and the residual
        streams [B,S,hc,D] the MTP block reads as a third item with `with_streams`.  Fork a state first
        (`fork_state`) to keep the old one."""
        ids = self.check_ids(ids)
        self.check_length(self.runner.position(state) + ids.shape[1])
        with quiet_numerics():
            logits, streams = self.runner.step(state, ids)
        logits = self.check_finite(logits.astype(np.float32))
        return (logits, state, streams) if with_streams else (logits, state)

    @property
    def has_mtp(self) -> bool:
        """Whether this model can run its MTP block: the config has one and the runner carries it (an ONNX
        export made with `--no-mtp` does not)."""
        return self.config.num_nextn_predict_layers > 0 and getattr(self.runner, "has_mtp", True)

    @property
    def default_draft_tokens(self) -> int:
        """Tokens the MTP block drafts per step when a caller does not say (`portable.speculative`)."""
        from .speculative import default_draft_tokens
        return default_draft_tokens(self)

    def new_mtp_state(self, batch: int = 1):
        """A fresh state of the MTP block."""
        return self.runner.new_mtp_state(batch)

    @property
    def draft_vocab(self):
        """The ids `mtp_step`'s logits cover (`GraphRunner.draft_vocab`), or None: all of them."""
        return self.runner.draft_vocab

    def mtp_step(self, state, streams, ids_next):
        """Feed main `streams` [B,S,hc,D] with the next ids [B,S] to the MTP `state` (in place) to draft;
        returns (float32 logits [B,S,U] of the `draft_vocab` ids (all V ids when it is None) for the ids
        after those, the block's output streams)."""
        ids_next = self.check_ids(ids_next)
        with quiet_numerics():
            logits, h = self.runner.mtp_step(state, streams, ids_next, with_streams=True, draft=True)
        return self.check_finite(logits.astype(np.float32)), h

    def fork_state(self, state):
        """An independent copy of `state` (cost proportional to the tokens it holds)."""
        return self.runner.fork(state)

    def state_info(self, state) -> dict:
        """What a state really holds: tokens (longest sequence), capacity (tokens its buffers fit) and the
        bytes of its buffers."""
        return {"tokens": self.runner.position(state), "capacity": int(state.capacity),
                "bytes": int(state.nbytes())}

    def forward(self, ids, chunk: int | None = None, full_precision: bool = False):
        """Logits for every position of ids ([S] or [B,S]) from a fresh state, float32 NumPy (or the
        backend's compute precision with `full_precision`, e.g. float64 for the oracle)."""
        ids = self.check_ids(ids)
        single = ids.ndim == 1
        ids2 = ids[None] if single else ids
        self.check_length(ids2.shape[1])
        state = self.new_state(ids2.shape[0])
        chunk = chunk or ids2.shape[1]
        outs = []
        for a in range(0, ids2.shape[1], chunk):
            with quiet_numerics():
                logits, _ = self.runner.step(state, ids2[:, a:a + chunk])
            outs.append(self.check_finite(logits))
        out = np.concatenate(outs, 1)
        out = out if full_precision else out.astype(np.float32)
        return out[0] if single else out

    def mtp_forward(self, ids, ids_next):
        """MTP logits [S,V] for main ids [S] and the next-token ids [S] (from fresh states)."""
        ids = self.check_ids(ids)[None]
        nxt = self.check_ids(ids_next)[None]
        self.check_length(ids.shape[1])
        with quiet_numerics():
            _, streams = self.runner.step(self.new_state(1), ids)
            logits = self.runner.mtp_step(self.runner.new_mtp_state(1), streams, nxt)
        return self.check_finite(logits[0].astype(np.float32))

    def generate(self, prompt_ids, **kw):
        from .generate import generate
        return generate(self, prompt_ids, **kw)

    def stream(self, prompt_ids, **kw):
        from .generate import stream
        return stream(self, prompt_ids, **kw)

    def generate_batch(self, prompts, **kw):
        """One `Result` per prompt, their decode steps batched (`portable.generate.generate_batch`)."""
        from .generate import generate_batch
        return generate_batch(self, prompts, **kw)


def resolve_path(path_or_preset) -> Path:
    """A model directory, the name of a synthetic preset (built once into the user cache), or a Hugging
    Face repo id (`portable.hub`: the local Hugging Face cache first, else a download).  What the
    directory holds is checked by `check_layout`."""
    p = Path(str(path_or_preset)).expanduser()
    name = str(path_or_preset)
    if p.exists():
        return p
    if name in SYNTHETIC:
        from .tiny import ensure_tiny
        return ensure_tiny(name)
    if name in PRESETS:
        raise FileNotFoundError(f"preset {name!r} has no weights on this machine; pass the directory of a "
                                f"downloaded DeepSeek-V4 checkpoint, or its Hugging Face repo id")
    if hub.is_repo_id(name):
        return hub.snapshot(name)
    raise FileNotFoundError(f"model directory not found: {p} (pass a checkpoint directory, a Hugging Face "
                            f"repo id such as deepseek-ai/DeepSeek-V4-Flash, or demo for the built-in demo model)")


def check_layout(path: Path, backend: str) -> str | None:
    """Refuse a directory that is no model (`layout.backend_of`) or was written for another backend;
    returns the backend a converter wrote it for (None: the official layout).  A backend that reads the
    directory itself (the ONNX runner: manifest, graphs, data) checks it itself."""
    if backend in _READS_DIRECTORY:
        return None
    own = backend_of(path)
    if own is not None and own != backend:
        raise BackendError(f"{path} was {'exported' if own == 'onnx' else 'converted'} for backend {own!r}; "
                           f"load it with backend={own!r}" + ("" if own == "onnx" else
                                                              ", or load the original checkpoint"))
    return own


def context_for(cfg: ModelConfig, context: int | None, default: int = DEFAULT_CONTEXT) -> int:
    """The context to load with: `context`, or `default` capped at the model's limit.  One rule for the
    API and the CLI: a context beyond the limit (config.json's max_position_embeddings, which an export
    sets to its fixed max_len) is refused, never clamped."""
    limit = cfg.max_position_embeddings
    if context is None:
        return min(default, limit)
    if not 1 <= context <= limit:
        raise ContextError(f"context {context} is outside this model's range of 1..{limit} tokens "
                           f"(max_position_embeddings in its config.json)")
    return context


def own_tokenizer(path: Path, cfg: ModelConfig):
    """The checkpoint's own tokenizer, built and checked against the model (control tokens present, no
    id beyond vocab_size) before any weight is read, so a wrong one fails fast in one line; None for a
    weights-only directory (no tokenizer.json), whose `model.tokenizer`, the official tokenizer, is
    checked the same way when first used."""
    if not (path / "tokenizer.json").is_file():
        return None
    from .encoding.tokenizer import model_tokenizer
    return model_tokenizer(path, cfg.vocab_size)


def default_state_format(backend: str, dtype: str, cfg: ModelConfig | None = None) -> str:
    """"deploy" (FP8/FP4 entries) for bfloat16 runs on the deployment backends of a config its blocks
    tile (`cache.deploy_fits`), else entries as computed."""
    deploy = dtype == "bfloat16" and backend in ("mlx", "cuda") and (cfg is None or cache.deploy_fits(cfg))
    return "deploy" if deploy else "bf16"


def load(path_or_preset, backend: str = "reference", dtype: str = "float32", emulate: bool = False,
         context: int | None = None, validate: bool = True, progress=None, state_format: str | None = None,
         comm=None, **backend_options) -> Model:
    """Load a V4 model (a directory in the official layout, a backend's converted directory or an ONNX
    export; a Hugging Face repo id; or a synthetic preset: `resolve_path`) on a backend.

    `context` is the longest sequence allowed (states grow with the tokens held, never to `context` up
    front), by default 16K or the model's limit if lower; a context beyond the limit is refused
    (`context_for`).  The checkpoint's tokenizer is checked against the model (`own_tokenizer`), and with
    `validate` an official-layout checkpoint against its config, values included (`Checkpoint.check`: a
    chunked NaN/Inf scan of every tensor whose format can hold one, so broken weights fail here in one
    line instead of sampling garbage).

    `state_format` is how compressed entries are stored: "bf16" (the activation dtype) or "deploy" (FP8
    nope + BF16 rope + E8M0, FP4 indexer keys; model spec §5), by default `default_state_format`.

    `progress(bytes_read, bytes_total)` is called while a backend copies weights into its own memory (MLX,
    torch); the reference maps the checkpoint and reads each tensor when first used, so it reports
    nothing at load (nor does the value scan, which reads without keeping anything).

    `comm` (a `portable.parallel.Comm` of world > 1) loads one rank of a parallel run: the backend reads
    only the rank's part of the official-layout checkpoint (`weights.ShardReader`), its `Ops` joins the
    ranks' collectives, and rank 0's runner broadcasts its calls (`parallel.LeaderRunner`); the other
    ranks serve them with `parallel.follow(model.runner, comm)`."""
    from .checkpoint import Checkpoint
    make_runner = get_backend(backend)
    path = resolve_path(path_or_preset)
    converted = check_layout(path, backend) is not None     # tensors in the backend's own layout
    cfg = ModelConfig.from_file(path)
    ctx = context_for(cfg, context)
    tokenizer = own_tokenizer(path, cfg)
    fmt = state_format or default_state_format(backend, dtype, cfg)
    cache.check_format(fmt, cfg)
    parallel = comm is not None and comm.world > 1
    if parallel and (backend in _READS_DIRECTORY or converted):
        what = "an ONNX export (ONNX runs in one process)" if backend in _READS_DIRECTORY else "converted"
        raise BackendError(f"a parallel run reads the official checkpoint layout; {path} is {what}")
    if backend in _READS_DIRECTORY:
        runner = make_runner(cfg, path, dtype=dtype, emulate=emulate, state_format=fmt, **backend_options)
    else:
        ckpt = Checkpoint(path)
        if validate and not converted:
            ckpt.validate(cfg, values=not parallel or comm.rank == 0)    # one rank scans the values
        if parallel:
            from .sharding import shard
            from .weights import ShardReader
            ckpt = ShardReader(ckpt, shard(cfg, comm.rank, comm.world))
        ckpt.watch(progress)
        runner = make_runner(cfg, ckpt, dtype=dtype, emulate=emulate, state_format=fmt, **backend_options)
        ckpt.watch(None)
    if parallel:
        from .parallel import LeaderRunner
        runner.ops.comm = comm
        runner = LeaderRunner(runner, comm) if comm.rank == 0 else runner
    model = Model(cfg, runner, path, backend, dtype, ctx)
    model._tokenizer = tokenizer
    return model

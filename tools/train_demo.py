"""Train the shipped demo model: a small DeepSeek V4 that does integer arithmetic (`demo_corpus.py`).

    python tools/train_demo.py --out /tmp/demo-ckpt [--steps N] [--seed S] [--curve curve.json] [--init CKPT]

The shipped demo is four runs of this script (87 min on a 2-core CPU in all), each continuing from the
checkpoint the one before wrote; benchmarks/results/demo_train.json records each run's command, the
version of this script it ran and its training curve.  Then `portable.tiny.pack_demo` packs it.

Why this way:
* One model description.  The forward pass is `portable.graph` itself on `TorchOps` (the torch backend,
  here on the CPU) with torch autograd; the weight store below hands the graph torch parameters under the
  official tensor names, so what is trained is exactly what every backend later runs.  A training step
  starts from a fresh state per sequence (`cache.State.new`); `TorchOps.write_rows` updates a state out
  of place while autograd records, so backward sees every buffer as it was read.
* The 129,280-row embedding and head dominate the cost, and the corpus uses a few hundred token ids.
  Exact trick: only the rows of the ids the corpus uses (`used_ids`) are parameters; every other row is
  exactly zero and stays zero.  The graph runs on compact ids (embedding rows and the hash-routing table
  `tid2eid` indexed by position in `used_ids`), and the loss adds the zero rows' logits back exactly: an
  unused id's logit is 0, so the full-vocabulary log-normaliser is logsumexp(compact logits, log(V − U)).
  The checkpoint scatters the trained rows into zero tables of the full size.
* The MTP block is trained too (cross-entropy on token t+2, weight `MTP_WEIGHT`), so speculative
  decoding has drafts worth accepting.
* The last `--qat` fraction of the steps trains through the checkpoint's quantization (straight-through:
  the forward uses the FP8/FP4 round trip of `portable.quant`, the gradient goes to the float weights), so
  the FP8 attention / FP4 expert checkpoint keeps the float model's accuracy.
* The checkpoint is written by `portable.tiny.write_checkpoint` (the official layout's one writer).
* Reproducible: every random choice comes from `--seed` (corpus, initialisation, batches), and torch runs
  with a fixed thread count (`--threads`).  (torch's "deterministic algorithms" switch is left off: its
  CPU scatter-add, which the backward of the graph's row gathers uses, is ~30x slower.)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus as corpus  # noqa: E402

from dsv4.backends.cuda.ops import TorchOps  # noqa: E402
from dsv4.portable import cache, graph, quant  # noqa: E402
from dsv4.portable.checkpoint import EXPERT_PROJ, EXPERTS, LINEAR, TABLE, weight_schema  # noqa: E402
from dsv4.portable.config import ModelConfig, preset  # noqa: E402
from dsv4.portable.encoding import load_tokenizer, render_prompt  # noqa: E402
from dsv4.portable.tiny import init_tensor, write_checkpoint  # noqa: E402

MTP_WEIGHT = 0.3
FACT_WEIGHT = 4.0       # loss weight of a computed result (the sign and number tokens after " =")
ROW_FLOOR = 64          # a batch row costs at least this many tokens (the state's buffers have ≥ 128 rows)


# ---------------------------------------------------------------------- corpus → token ids
def encode(tok, msgs, mode, tools) -> tuple:
    """(ids, mask) of one conversation: mask marks what the model generates (each assistant reply that the
    prompt of its turn continues into, through its end-of-sentence token)."""
    full = tok.encode_prompt(render_prompt(msgs, thinking_mode=mode, tools=tools))
    mask = np.zeros(len(full), dtype=bool)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = tok.encode_prompt(render_prompt(msgs[:i], thinking_mode=mode, tools=tools))
        if full[:len(prefix)] != prefix:                        # history whose reasoning the encoder dropped
            continue
        end = full.index(tok.eos_id, len(prefix))
        mask[len(prefix):end + 1] = True
    return np.asarray(full, dtype=np.int64), mask


def used_ids(tok, examples) -> np.ndarray:
    """Every id the corpus can contain: those of the sampled conversations plus every integer in -999..999
    (so a fresh problem never meets an untrained row)."""
    ids = set(np.concatenate([e[0] for e in examples]).tolist())
    for n in range(-999, 1000):
        for text in (f"{n}", f" {n}", f"= {n}.", f"{n}?", f"{n}."):
            ids.update(tok.encode(text))
    ids.update([tok.bos_id, tok.eos_id])
    return np.asarray(sorted(ids), dtype=np.int64)


# ---------------------------------------------------------------------- parameters
def init_params(cfg: ModelConfig, used: np.ndarray, tok, seed: int) -> dict:
    """name → float32 torch parameter, by the synthetic initialisation of `portable.tiny` (embedding and
    head only for the used rows; number tokens' embedding rows start from shared digit vectors, so the
    model begins with the place-value structure arithmetic needs).  Hash tables are drawn once (not trained)."""
    rng = np.random.default_rng(seed)
    d, params = cfg.hidden_size, {}
    for name, entry in weight_schema(cfg).items():
        if entry.role == TABLE:
            continue
        if entry.role == EXPERTS:
            for e in range(entry.experts):
                for p in EXPERT_PROJ:
                    spec = next(t for t in entry.tensors if t.name == f"{name}{e}.{p}.weight")
                    shape = (spec.shape[0], spec.shape[1] * (2 if spec.dtype == "I8" else 1))
                    params[f"{name}{e}.{p}.weight"] = init_tensor(f"{name}{e}.{p}.weight", shape, rng)
            continue
        shape = entry.tensors[0].shape
        if name in ("embed.weight", "head.weight"):
            shape = (len(used), d)
        params[name] = init_tensor(name, shape, rng)
    params["head.weight"] = params["head.weight"] * 0.25
    for name, scale in (("embed.weight", 1.0), ("head.weight", 0.5 / math.sqrt(d))):
        digits = rng.standard_normal((3, 10, d)) * scale
        for row, i in enumerate(used):
            text = tok.decode([int(i)]).strip()
            if text.isdigit():
                n = int(text)
                params[name][row] = 0.5 * params[name][row] + (
                    digits[0, n % 10] + digits[1, n // 10 % 10] + digits[2, n // 100 % 10]) / math.sqrt(3)
    return {k: torch.nn.Parameter(torch.as_tensor(np.asarray(v, dtype=np.float32))) for k, v in params.items()}


def params_from_checkpoint(cfg: ModelConfig, path: Path, used: np.ndarray) -> tuple:
    """(parameters, hash tables) from a checkpoint this script wrote, to train further (`--init`): each
    tensor as stored (linears and experts dequantized), embedding and head narrowed to the used rows."""
    from dsv4.portable.checkpoint import Checkpoint
    ckpt = Checkpoint(path)
    params, tables = {}, {}
    for name, entry in weight_schema(cfg).items():
        if entry.role == TABLE:
            tables[name] = ckpt.table(name, cfg.n_routed_experts)
        elif entry.role in (LINEAR, EXPERTS):
            for prefix in entry.linears():
                params[prefix + ".weight"] = quant.dequantize(ckpt.quant_weight(prefix), np.float32)
        else:
            params[name] = ckpt.array(name, np.float32)
    for name in ("embed.weight", "head.weight"):
        params[name] = params[name][used]
    return {k: torch.nn.Parameter(torch.as_tensor(np.ascontiguousarray(v))) for k, v in params.items()}, tables


def hash_tables(cfg: ModelConfig, seed: int) -> dict:
    """Full-vocabulary `tid2eid` tables (distinct experts per token id), seeded."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, entry in weight_schema(cfg).items():
        if entry.role == TABLE:
            keys = rng.random((cfg.vocab_size, cfg.n_routed_experts))
            out[name] = np.argsort(keys, axis=1)[:, :cfg.num_experts_per_tok].astype(np.int64)
    return out


def _fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w with the forward value of its checkpoint round trip and the identity gradient."""
    a = w.detach().numpy()
    q = quant.quantize_fp4(a) if fmt == "fp4" else quant.quantize_fp8_block(a)
    return w + (torch.as_tensor(quant.dequantize(q, np.float32)) - w).detach()


class TrainWeights:
    """The graph's weight store (`W[name]`, `W.experts(prefix)`) over torch parameters; compact tables for
    compact ids; with `quantized`, linears and experts in their checkpoint precision (straight-through)."""

    def __init__(self, cfg: ModelConfig, params: dict, tables: dict, used: np.ndarray):
        self.cfg, self.params, self.quantized = cfg, params, False
        self.schema = weight_schema(cfg)
        self.tables = {k: torch.as_tensor(v[used]) for k, v in tables.items()}
        self._step: dict = {}

    def new_step(self):
        self._step = {}                 # fake-quantized copies are made once per step

    def _q(self, name: str, fmt: str):
        if not self.quantized:
            return self.params[name]
        if name not in self._step:
            self._step[name] = _fake_quant(self.params[name], fmt)
        return self._step[name]

    def __getitem__(self, name: str):
        role = self.schema[name].role
        if role == TABLE:
            return self.tables[name]
        return self._q(name, "fp8") if role == LINEAR else self.params[name]

    def experts(self, prefix: str):
        fmt = self.cfg.expert_dtype
        return [tuple(self._q(f"{prefix}{e}.{p}.weight", fmt) for p in EXPERT_PROJ)
                for e in range(self.schema[prefix].experts)]


# ---------------------------------------------------------------------- loss
def batch_loss(o: TorchOps, W: TrainWeights, cfg: ModelConfig, ids: torch.Tensor, mask: torch.Tensor,
               unused: int, equals: int) -> tuple:
    """(main loss, MTP loss, token accuracy, fact accuracy) of a right-padded batch of compact ids [B,S];
    fact accuracy counts only the generated tokens two after " =" (the computed results: " = 82", " = -33").
    The main loss weighs the two tokens after " =" (sign and result) `FACT_WEIGHT` times: they are the few
    hard tokens among many that the chat format makes predictable."""
    b, s = ids.shape
    state = cache.State.new(o, cfg, b, cache.capacity_for(s))
    logits, streams = graph.forward(o, W, cfg, state, ids)
    pad = math.log(unused)

    def ce(lg, target, m, weight):
        norm = torch.logaddexp(torch.logsumexp(lg, -1), torch.tensor(pad))
        nll = norm - torch.gather(lg, -1, target[..., None])[..., 0]
        return (nll * weight).sum() / m.sum().clamp(min=1)

    tgt, m = ids[:, 1:], mask[:, 1:].float()
    fm = m * torch.nn.functional.pad(ids[:, :-2] == equals, (1, 0)).float()      # the result token
    sign = m * (ids[:, :-1] == equals).float()                                     # the sign token before it
    main = ce(logits[:, :-1], tgt, m, m + (FACT_WEIGHT - 1) * (fm + sign))
    right = (logits[:, :-1].argmax(-1) == tgt).float()
    hit = (right * m).sum() / m.sum().clamp(min=1)
    fact = (right * fm).sum() / fm.sum().clamp(min=1)
    mstate = cache.State.new(o, cfg, b, cache.capacity_for(s), mtp=True)
    mlog = graph.mtp_forward(o, W, cfg, mstate, streams[:, :-1], ids[:, 1:])       # predicts ids[:, 2:]
    mm = mask[:, 2:].float()
    mtp = ce(mlog[:, :-1], ids[:, 2:], mm, mm)
    return main, mtp, float(hit), float(fact)


def batches(rng: random.Random, examples: list, token_budget: int):
    """Batches of similar length (right-padded) of at most `token_budget` padded tokens (a row counting at
    least `ROW_FLOOR`), in random order."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * max(len(examples[i][0]), ROW_FLOOR) > token_budget:
            out.append(cur)
            cur = []
        cur.append(i)
    out.append(cur)
    rng.shuffle(out)
    return out


def pad_batch(examples, idx, remap) -> tuple:
    s = max(len(examples[i][0]) for i in idx)
    ids = np.zeros((len(idx), s), dtype=np.int64)
    mask = np.zeros((len(idx), s), dtype=bool)
    for r, i in enumerate(idx):
        n = len(examples[i][0])
        ids[r, :n], mask[r, :n] = remap[examples[i][0]], examples[i][1]
    return torch.as_tensor(ids), torch.as_tensor(mask)


# ---------------------------------------------------------------------- driver
def train(cfg: ModelConfig, steps: int, seed: int = 0, conversations: int = 20000, token_budget: int = 8192,
          lr: float = 3e-3, qat: float = 0.15, log_every: int = 10, out: Path | None = None, log=print,
          init: Path | None = None) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer()
    t0 = time.time()
    examples = [encode(tok, *corpus.conversation(rng)) for _ in range(conversations)]
    used = used_ids(tok, examples)
    remap = np.zeros(cfg.vocab_size, dtype=np.int64)
    remap[used] = np.arange(len(used))
    log(f"corpus: {len(examples)} conversations, {sum(len(e[0]) for e in examples)} tokens, "
        f"{len(used)} distinct ids ({time.time() - t0:.1f} s)")
    if init is None:
        params, tables = init_params(cfg, used, tok, seed), hash_tables(cfg, seed)
    else:
        params, tables = params_from_checkpoint(cfg, init, used)
    W = TrainWeights(cfg, params, tables, used)
    o = TorchOps("float32", device="cpu", kernels=False)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1)))))
    curve, queue, step = [], [], 0
    acc = {"loss": 0.0, "mtp": 0.0, "hit": 0.0, "fact": 0.0, "n": 0}
    equals = int(remap[tok.encode(" =")[0]])
    t0 = time.time()
    while step < steps:
        if not queue:
            queue = batches(rng, examples, token_budget)
        ids, mask = pad_batch(examples, queue.pop(), remap)
        W.quantized = step >= steps * (1 - qat)
        W.new_step()
        main, mtp, hit, fact = batch_loss(o, W, cfg, ids, mask, cfg.vocab_size - len(used), equals)
        opt.zero_grad()
        (main + MTP_WEIGHT * mtp).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sched.step()
        step += 1
        acc["loss"] += main.item()
        acc["mtp"] += mtp.item()
        acc["hit"] += hit
        acc["fact"] += fact
        acc["n"] += 1
        if step % log_every == 0 or step == steps:
            n = acc["n"]
            row = {"step": step, "loss": acc["loss"] / n, "mtp_loss": acc["mtp"] / n,
                   "token_accuracy": acc["hit"] / n, "fact_accuracy": acc["fact"] / n, "lr": sched.get_last_lr()[0],
                   "quantized": W.quantized, "seconds": round(time.time() - t0, 1)}
            curve.append(row)
            log(json.dumps(row))
            acc = {"loss": 0.0, "mtp": 0.0, "hit": 0.0, "fact": 0.0, "n": 0}
    result = {"config": cfg.to_dict(), "seed": seed, "steps": steps, "init": str(init) if init else None,
              "conversations": conversations,
              "token_budget": token_budget, "lr": lr, "qat": qat, "used_ids": len(used),
              "train_seconds": round(time.time() - t0, 1), "curve": curve}
    if out is not None:
        export(cfg, params, tables, used, out)
    return result


def full_tensors(cfg: ModelConfig, params: dict, tables: dict, used: np.ndarray) -> dict:
    """name → float32 NumPy array of the full model (unused embedding / head rows exactly zero)."""
    floats = {k: v.detach().numpy().astype(np.float32) for k, v in params.items()}
    for name in ("embed.weight", "head.weight"):
        full = np.zeros((cfg.vocab_size, cfg.hidden_size), dtype=np.float32)
        full[used] = floats[name]
        floats[name] = full
    floats.update(tables)
    return floats


def export(cfg: ModelConfig, params: dict, tables: dict, used: np.ndarray, out: Path) -> Path:
    return write_checkpoint(cfg, out, tensors=full_tensors(cfg, params, tables, used), tokenizer="v4")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conversations", type=int, default=20000)
    ap.add_argument("--tokens", type=int, default=8192, help="padded tokens per batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--qat", type=float, default=0.15, help="final fraction of steps trained quantized")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curve", type=Path, help="write the training curve (JSON) here")
    ap.add_argument("--init", type=Path, help="continue from a checkpoint this script wrote (same --seed)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = train(preset(a.preset), a.steps, a.seed, a.conversations, a.tokens, a.lr, a.qat, out=a.out,
                   init=a.init)
    if a.curve:
        a.curve.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out} after {result['train_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

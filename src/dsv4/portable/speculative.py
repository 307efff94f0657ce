"""Speculative decoding with V4's MTP block: draft k tokens, verify them in one main step, undo the rest.

The engine (`portable.engine`) runs one decode round per step of a drafting job; this module holds the
pieces of that round, which are the same for every backend (they only use the runner contract, `Ops`
row reads/writes and the `Sampler`):

* **The MTP state follows the main state.**  The MTP block at position i reads the main residual
  streams at i and the token at i+1 (model spec §7).  A job keeps `mtp_h`, the main streams of its last
  m fed positions whose next tokens (the last m ids of tokens + pending) the MTP block has not read yet;
  prefill feeds it every pair it can (`prefill`), a round feeds the rest first.  So the MTP state always
  holds true pairs only.
* **Draft** (`draft`): the first draft comes from the true pairs (the last one pairs the newest main
  stream with the pending token); each further draft is the block applied again to its own output
  streams and its previous draft, as the official MTP chains.  Those chained positions are not true
  pairs, so their rows are undone at once (the next round feeds the true ones).  Drafts are scored over
  the model's draft vocabulary (`GraphRunner.draft_vocab`: the ids with a non-zero head row) and the
  other ids get probability 0 in q; any q keeps the rules below exact, so this only saves the cost of
  head rows that cannot win.
* **Verify** (`verify`): the main model reads [pending, d1..dk] in one [B, k+1] step; `accept` keeps
  the longest accepted prefix plus one corrected or bonus token.  Greedy: a draft is kept iff it is the
  argmax, so the output equals plain greedy decoding.  Sampling: standard speculative rejection
  sampling (keep d with probability min(1, p(d)/q(d)), else draw from max(p − q, 0)), with p and q the
  distributions `Sampler.distribution` gives for the same history (penalties, top-k/p, min-p and
  temperature applied the same way to both), so the output distribution is plain sampling's.
* **Undo** (`Undo`): why not verify into a fork: a fork copies the whole state, a cost that grows with
  the context.  A step of S tokens writes few rows (model spec §5, `portable.cache`): per ring (window
  keys, compressor rows) the rows of its S positions, per entry store the ≤ ⌈S/m⌉ entries its positions
  complete, and `start`.  `Undo` gathers exactly those rows before the step and, given how many tokens
  each row keeps, writes the old rows back wherever a position beyond the kept ones wrote them, then sets
  `start`.  What remains is bit for bit the state of feeding only the kept tokens (up to the rounding of
  the chunk shape), including an entry or indexer key a rejected token completed, at O(S) rows per
  buffer.  Spill rows hold scratch and are never read.
* **Backends** need nothing of their own beyond the runner contract: `mtp_step(..., with_streams=True)`
  for chaining (an ONNX export's MTP graph outputs its streams for this),
  `set_start` (CUDA graphs keep their `start` tensor) and `settle` (MLX evaluates the saved rows so
  the step can still write its buffers in place).  Compiled/captured steps cover k + 1 ≤ 8 tokens.
"""

from __future__ import annotations

import numpy as np

MAX_DRAFT = 7       # a step of k+1 ≤ 8 tokens writes distinct ring rows: the smallest ring (CSA ratio 4 × 2) has 8


HEAD_SHARE_LIMIT = 0.25      # drafting is off by default above this share of the head in a token's weights


def draft_head_share(cfg, rows: int | None = None) -> float:
    """The share of the head rows a draft scores (`rows`, None: all of them) against the rest of the
    weights one decode token multiplies (the embedding is a row lookup, so it is left out)."""
    head = cfg.vocab_size * cfg.hidden_size
    return (rows if rows is not None else cfg.vocab_size) * cfg.hidden_size / (cfg.param_counts()["active"] - head)


def default_draft_tokens(model) -> int:
    """Drafts per step of a greedy answer when the caller does not say (`Engine._drafts`: a sampled one
    drafts only when asked).  0 without an MTP layer.  0 as well when the head rows a draft scores are
    more than HEAD_SHARE_LIMIT of a token's other weights: a round costs k MTP layers with their heads
    plus one (k+1)-token verify step for ≈ 1 + k·acceptance tokens, which cannot beat plain decoding when
    each draft costs about a plain step (the demo scored over its whole 129,280-row vocabulary: head ≈ 16×
    the rest; k = 2 decoded at 0.75× with 85 % of the drafts kept).
    Else 2 (vLLM's MTP recipe: two chained drafts keep most of the gain of an accepting MTP block;
    V4-Flash's head is 4 % of its active weights; the demo's 1,225-row draft vocabulary, 0.15×).  A job
    drafting by default stops when its drafts are mostly rejected (`keeps_drafting`), so a random-weight
    model pays only for the first rounds."""
    if cannot_draft(model):
        return 0
    vocab = model.draft_vocab
    if draft_head_share(model.config, None if vocab is None else len(vocab)) > HEAD_SHARE_LIMIT:
        return 0
    return 2


def cannot_draft(model) -> str | None:
    """Why `model` cannot draft at all, or None: no MTP layer, or a parallel run (its followers replay
    runner calls, while a round also undoes state rows through rank 0's `Ops`)."""
    if not getattr(model, "has_mtp", False):
        return "this model has no MTP layer to draft with"
    if getattr(model.runner, "world", 1) > 1:
        return "speculative decoding runs in one process, not in a parallel run"
    return None


PROBE_DRAFTS, MIN_ACCEPTANCE = 16, 0.25


def keeps_drafting(drafted: int, accepted: int) -> bool:
    """Whether a job drafting by default goes on: once it has drafted PROBE_DRAFTS tokens, only while at
    least MIN_ACCEPTANCE of them were kept.  Below that a round costs k MTP steps and a (k+1)-token
    verify for little more than the one token plain decoding gives (a random-weight model keeps ~1/vocab
    of its drafts), so such a job finishes without drafting; the tokens are the same either way.  A job
    that asked for drafts explicitly always drafts."""
    return drafted < PROBE_DRAFTS or accepted >= MIN_ACCEPTANCE * drafted


def check_draft_tokens(k: int, model=None, name: str = "draft_tokens") -> int:
    """`k` as an int, refused (ValueError, one line naming the setting as `name`) outside 0..MAX_DRAFT
    and, given `model`, where `cannot_draft` says why.  The engine, the CLI and the server all check
    here."""
    k = int(k)
    if not 0 <= k <= MAX_DRAFT:
        raise ValueError(f"{name} must be in 0..{MAX_DRAFT}, got {k}")
    why = cannot_draft(model) if k and model is not None else None
    if why:
        raise ValueError(f"{name} {k}: {why}; use {name} 0")
    return k


# ---------------------------------------------------------------------- undo the rows of a step
def _rows(cfg, name: str, rows_total: int, start: np.ndarray, tokens: int):
    """(rows [B,M] that a step of `tokens` tokens at `start` writes in buffer `name`, the position whose
    token writes each row [B,M])."""
    key, _, rest = name.partition(".")
    if rest in ("window", "kv", "gate", "index.kv", "index.gate"):         # rings: position t in row t % size
        size = rows_total - 1
        if tokens > size:
            raise ValueError(f"a verify step of {tokens} tokens overflows the {size}-row ring {name}")
        pos = start[:, None] + np.arange(tokens)[None]
        return pos % size, pos
    layer = cfg.num_hidden_layers if key == "mtp" else int(key[1:])
    m = cfg.ratio(layer)                                                   # entry stores: entry j in row j
    j = start[:, None] // m + np.arange(-(-tokens // m))[None]
    return np.minimum(j, rows_total - 1), (j + 1) * m - 1


class Undo:
    """The rows a step of `tokens` tokens is about to write in `state`, saved so `restore` can take back
    the tokens each row should not keep (module docstring)."""

    def __init__(self, runner, state, tokens: int):
        o = runner.ops
        runner.reserve(state, tokens)                 # locate the rows in the buffers the step will write
        self.start = np.asarray(o.to_numpy(state.start), dtype=np.int64).copy()
        self.saved = {}
        for name, buf in state.items():
            if name == "start":
                continue
            rows, pos = _rows(state.cfg, name, buf.shape[1], self.start, tokens)
            self.saved[name] = (rows, pos, o.gather_rows(buf, o.asarray(rows, "int")))
        runner.settle([v[2] for v in self.saved.values()])

    def restore(self, runner, state, keep) -> None:
        """Keep the first keep[b] tokens of the step in row b; every row written by a later one gets its
        old value back, and `start` = old start + keep."""
        o = runner.ops
        end = self.start + np.asarray(keep, dtype=np.int64)
        for name, (rows, pos, old) in self.saved.items():
            spill = state.buffers[name].shape[1] - 1
            dest = np.where(pos >= end[:, None], rows, spill)
            state.buffers[name] = o.write_rows(state.buffers[name], o.asarray(dest, "int"), old)
        runner.set_start(state, end)


# ---------------------------------------------------------------------- prefill: feed the MTP block
def prefill(model, state, mtp_state, ids, chunk: int, carry, known=()):
    """Feed `ids` to the main `state` in chunks and every true (stream, next id) pair to `mtp_state`;
    `carry` holds the streams of the last positions fed before that the MTP block still owes (None at
    a sequence's start), `known` the next ids of all but the last of them.  Returns (next-token logits,
    the new carry: the last position's stream, whose next id is still unknown)."""
    o = model.runner.ops
    logits, known = None, list(known)
    for a in range(0, len(ids), chunk):
        part = list(ids[a:a + chunk])
        logits, _, streams = model.step(state, np.asarray([part], dtype=np.int64), with_streams=True)
        h = streams[:, :-1] if carry is None else o.concat([carry, streams[:, :-1]], 1)
        nxt = part[1:] if carry is None else known + part
        if len(nxt):
            model.mtp_step(mtp_state, h, np.asarray([nxt], dtype=np.int64))
        carry, known = streams[:, -1:], []
    return logits[0, -1], carry


# ---------------------------------------------------------------------- draft, verify, accept
class Row:
    """One sequence of a round: its sampler, history (ids fed, pending included), the MTP input
    it still owes (`h` streams with next ids `ids`) and how many drafts it may take (`k`)."""

    def __init__(self, sampler, history: list, h, ids: list, k: int):
        self.sampler, self.history, self.h, self.ids, self.k = sampler, history, h, ids, k
        self.drafts: list = []
        self.q: list = []            # the draft distributions


def draft(model, mtp_state, rows: list) -> bool:
    """Fill each row's `drafts` (at most its `k`) and their distributions `q` from the MTP block; the
    owed true pairs are fed for good (True: the rows owe nothing now), the chained positions undone."""
    runner, o = model.runner, model.runner.ops
    m = [0 if r.h is None else r.h.shape[1] for r in rows]
    big = max(m)
    if big == 0 or max(r.k for r in rows) == 0:
        return False
    some = next(r.h for r in rows if r.h is not None)
    hs, ids = [], []
    for r, n in zip(rows, m):                       # right-pad to the longest: the pad rows are undone
        h = r.h if n else some[:, :1]
        hs.append(h if n == big else o.concat([h] + [h[:, -1:]] * (big - max(n, 1)), 1))
        ids.append((r.ids + [r.ids[-1] if n else 0] * big)[:big])
    undo = Undo(runner, mtp_state, big) if min(m) < big else None
    logits, h = model.mtp_step(mtp_state, o.concat(hs, 0), np.asarray(ids, dtype=np.int64))
    if undo is not None:
        undo.restore(runner, mtp_state, m)
    last = np.maximum(np.asarray(m) - 1, 0)
    ks = [r.k if n else 0 for r, n in zip(rows, m)]
    depth = max(ks)
    cur = [_over_vocab(model, logits[i, last[i]]) for i in range(len(rows))]
    g = o.gather_rows(h, o.asarray(last[:, None], "int"))
    chain = Undo(runner, mtp_state, depth - 1) if depth > 1 else None
    for step in range(depth):
        for r, lg, k in zip(rows, cur, ks):
            if step < k:
                q = r.sampler.distribution(lg, r.history + r.drafts, ahead=r.drafts)
                r.drafts.append(r.sampler.draw(q))
                r.q.append(q)
        if step + 1 < depth:
            prev = np.asarray([[r.drafts[-1] if r.drafts else 0] for r in rows], dtype=np.int64)
            lg, g = model.mtp_step(mtp_state, g, prev)
            cur = [_over_vocab(model, lg[i, 0]) for i in range(len(rows))]
    if chain is not None:
        chain.restore(runner, mtp_state, np.zeros(len(rows), dtype=np.int64))
    return True


def _over_vocab(model, lg):
    """Draft logits over the model's draft vocabulary [U] as logits over all ids [V], −inf for the ids
    outside it (q gives them probability 0)."""
    vocab = model.draft_vocab
    if vocab is None:
        return lg
    full = np.full(model.config.vocab_size, -np.inf, dtype=np.float32)
    full[vocab] = lg
    return full


def verify(model, state, pending: list, rows: list):
    """One main step on [pending, drafts] per row (short rows padded; `accept` caps them at their own
    drafts).  Returns (logits [B,S,V], streams, the `Undo` of the step)."""
    s = 1 + max(len(r.drafts) for r in rows)
    ids = [([p] + r.drafts + [r.drafts[-1] if r.drafts else p] * s)[:s] for p, r in zip(pending, rows)]
    undo = Undo(model.runner, state, s)
    logits, _, streams = model.step(state, np.asarray(ids, dtype=np.int64), with_streams=True)
    return logits, streams, undo


def accept(row: Row, logits) -> list:
    """The tokens a verified row keeps (its accepted drafts, then one corrected or bonus token), drawn
    from the target distributions `logits` [≥ k+1, V] with the row's sampler (module docstring)."""
    s, new = row.sampler, []
    for d, q, lg in zip(row.drafts, row.q, logits):
        p = s.distribution(lg, row.history + new, ahead=new)
        ratio = p[d] / q[d]
        if ratio >= 1 or (ratio > 0 and s.rng.random() < ratio):
            new.append(d)
            continue
        resid = np.maximum(p - q, 0.0)
        new.append(s.draw(resid / resid.sum()))
        return new
    p = s.distribution(logits[len(new)], row.history + new, ahead=new)
    new.append(s.draw(p))
    return new

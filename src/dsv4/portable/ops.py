"""The op interface every backend implements, and V4's composite ops written once on top of it.

Why this shape (tinygrad's idea): a backend implements ~30 small primitives; the composites that matter for
speed (sink attention over an index set, the lightning indexer's top-k, mHC, MoE, quantized linear) have a
default decomposition here that a backend may replace with a kernel.  The default decomposition is then the
kernel's reference.  Nothing here imports numpy, mlx, torch or onnx.

Conventions the graph relies on:
* Arrays are the backend's own type; the graph uses Python operators (+ - * / // % < <= >= == unary -)
  and basic slicing with constant ints on them, which numpy, mlx and torch all share.  Everything else goes
  through an `Ops` method.
* `hp(x)` moves a value to the high-precision compute dtype (fp32 sections of model spec §9.1); `act(x)`
  rounds it to the activation storage dtype (bf16 in production).  In float32/float64 runs both are
  identities, which is what lets one graph serve the fp64 oracle and a bf16 deployment.
* Index arrays use −1 for "skip".  `topk` breaks ties toward the lower index (model spec §11.1b), so all
  backends select the same entries.
* Linear weights are whatever the backend's weight loader produced (quantized or dense); only `linear`,
  `grouped_linear`, `dense` and `moe` look inside them.
* `all_reduce` / `all_gather` join the ranks of a parallel run (`portable.sharding`) through `comm`, the
  backend's communicator; in one process (`comm` None) they are identities, so no backend need know.
"""

from __future__ import annotations

import math

NEG_INF = float("-inf")


class Segment:
    """A set of key rows (K = V) for `Ops.sink_attention`, in one of three forms:
    * `Segment.gather(kv [B,N,d], idx [B,S,K])` — query s attends rows idx[b,s,:] (−1 = skip);
    * `Segment.dense(kv [B,N,d], mask [B,S,N])` — query s attends every row where mask is true;
    * `Segment.per_query(rows [B,S,K,d], valid [B,S,K])` — rows already gathered per query."""

    def __init__(self, kv, idx=None, mask=None, per_query=False):
        self.kv, self.idx, self.mask, self.is_per_query = kv, idx, mask, per_query

    @classmethod
    def gather(cls, kv, idx):
        return cls(kv, idx=idx)

    @classmethod
    def dense(cls, kv, mask):
        return cls(kv, mask=mask)

    @classmethod
    def per_query(cls, rows, valid):
        return cls(rows, mask=valid, per_query=True)

    def rows(self, o):
        """(keys, per_query): [B,S,K,d] gathered per query, or the shared [B,N,d] rows."""
        if self.idx is None:
            return self.kv, self.is_per_query
        b, s, k = self.idx.shape
        flat = o.reshape(o.maximum(self.idx, 0), [b, s * k])
        return o.reshape(o.gather_rows(self.kv, flat), [b, s, k, self.kv.shape[-1]]), True

    def valid(self, o):
        return self.mask if self.idx is None else self.idx >= 0


class Ops:
    """Abstract op set.  Subclasses implement the primitives; composites have default decompositions."""

    name = "abstract"
    comm = None     # the communicator of a parallel run (`portable.parallel.Comm`); None: one process

    # ------------------------------------------------------------------ collectives (`portable.sharding`)
    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.rank

    @property
    def world(self) -> int:
        return 1 if self.comm is None else self.comm.world

    def all_reduce(self, x):
        """Σ over ranks of x (every rank gets the same values); one process: x itself."""
        return x if self.comm is None else self.comm.all_reduce(x)

    def all_gather(self, x, axis):
        """The ranks' x concatenated along `axis` in rank order; one process: x itself."""
        return x if self.comm is None else self.comm.all_gather(x, axis)

    # ------------------------------------------------------------------ dtype points
    def hp(self, x):
        return x

    def act(self, x):
        return x

    # ------------------------------------------------------------------ primitives (backend must implement)
    def asarray(self, x, kind="float"):            # from a numpy array / python list; kind float|int|bool
        raise NotImplementedError

    def to_numpy(self, x):
        raise NotImplementedError

    def zeros(self, shape, kind="float"):
        raise NotImplementedError

    def full(self, shape, value, kind="float"):
        raise NotImplementedError

    def arange(self, n):                             # int array [n]
        raise NotImplementedError

    def to_float(self, x):                           # int → compute float
        raise NotImplementedError

    def matmul(self, a, b):
        raise NotImplementedError

    def exp(self, x):
        raise NotImplementedError

    def log(self, x):
        raise NotImplementedError

    def sqrt(self, x):
        raise NotImplementedError

    def abs(self, x):
        raise NotImplementedError

    def cos(self, x):
        raise NotImplementedError

    def sin(self, x):
        raise NotImplementedError

    def maximum(self, a, b):
        raise NotImplementedError

    def minimum(self, a, b):
        raise NotImplementedError

    def where(self, cond, a, b):
        raise NotImplementedError

    def sum(self, x, axis, keepdims=False):
        raise NotImplementedError

    def max(self, x, axis, keepdims=False):
        raise NotImplementedError

    def reshape(self, x, shape):
        raise NotImplementedError

    def transpose(self, x, axes):
        raise NotImplementedError

    def concat(self, xs, axis):
        raise NotImplementedError

    def broadcast_to(self, x, shape):
        raise NotImplementedError

    def take(self, x, idx, axis=0):                  # x[idx] along axis, idx any int array
        raise NotImplementedError

    def take_along_axis(self, x, idx, axis=-1):      # same ndim, like numpy
        raise NotImplementedError

    def widen(self, x, idx, size):                   # x [..., U] at positions idx [U] of a last axis of `size`,
        raise NotImplementedError                    # zeros elsewhere

    def gather_rows(self, x, idx):                   # x [B,N,...], idx [B,M] → [B,M,...]
        raise NotImplementedError

    def write_rows(self, buf, idx, rows):            # buf[b, idx[b,m]] = rows[b,m] (in the buffer's dtype); returns
        raise NotImplementedError                    # the buffer, which eager backends update in place

    def copy(self, x):                               # an independent copy (forking a state)
        raise NotImplementedError

    def state_buffer(self, shape, kind):             # zeros in the storage dtype of a cache buffer kind
        raise NotImplementedError                    # ("act" | "hp" | "int" | "u8", see `portable.cache`)

    def read(self, buf):                             # a stored buffer as compute values (bf16 words → float)
        return buf

    def trim(self, buf, count):                      # rows 0..max(count)−1 at least; traced backends return buf
        return buf

    def topk(self, x, k):                            # indices of the k largest along the last axis, largest first,
        raise NotImplementedError                    # ties → lower index (a partial selection, not a full sort)

    # state storage codecs (deploy format, model spec §5): values → (codes, E8M0 scale bytes) per block of the
    # last axis, and back.  FP8 codes are e4m3 bytes; FP4 codes are e2m1 nibbles, two per byte (low first).
    def encode_fp8(self, x, block):
        raise NotImplementedError

    def decode_fp8(self, codes, scales, block):
        raise NotImplementedError

    def encode_fp4(self, x, block):
        raise NotImplementedError

    def decode_fp4(self, packed, scales, block):
        raise NotImplementedError

    def dense(self, w):                              # a loaded weight as a dense compute-dtype array
        raise NotImplementedError

    def weight_rows(self, w, idx):
        """Rows idx (any int array) of a loaded weight [N, K] as dense compute-dtype values [*idx, K] (an
        embedding lookup, a head's live rows); a backend holding the weight in a compact form decodes only
        those rows."""
        return self.take(self.dense(w), idx, 0)

    def row_absmax(self, w):
        """The largest |value| of each row of a loaded weight [N] (what finds a head's live rows); a backend
        holding the weight in a compact form may answer without densifying it."""
        return self.max(self.abs(self.dense(w)), -1)

    # ------------------------------------------------------------------ numerics emulation hooks (§9.3)
    def kv_round(self, x, nope):                     # FP8 rounding of the first `nope` dims of KV entries
        return x

    def indexer_round(self, x):                      # Hadamard + FP4 rounding of indexer q / keys
        return x

    def rotate_fp4(self, x):
        """Hadamard rotation, then an FP4 round trip per 32: the indexer's q and keys in the deploy format
        (what `indexer_round` emulates; the rotation is orthonormal, so scores only change by the FP4)."""
        return self.decode_fp4(*self.encode_fp4(self.matmul(x, self.hadamard(x.shape[-1])), 32), 32)

    def hadamard(self, n):
        """The normalized Sylvester–Hadamard matrix H_n/√n (n a power of two) as a compute-dtype array."""
        h = [[1.0]]
        while len(h) < n:
            h = [row + row for row in h] + [row + [-v for v in row] for row in h]
        return self.asarray([[v / math.sqrt(n) for v in row] for row in h])

    # ------------------------------------------------------------------ small composites
    def sigmoid(self, x):
        return 1.0 / (1.0 + self.exp(-x))

    def softplus(self, x):
        return self.maximum(x, 0.0) + self.log(1.0 + self.exp(-self.abs(x)))

    def relu(self, x):
        return self.maximum(x, 0.0)

    def mean(self, x, axis, keepdims=False):
        return self.sum(x, axis, keepdims) * (1.0 / x.shape[axis])

    def rsqrt(self, x):
        return 1.0 / self.sqrt(x)

    def softmax(self, x, axis):
        e = self.exp(x - self.max(x, axis, keepdims=True))
        return e / self.sum(e, axis, keepdims=True)

    def rms_norm(self, x, w, eps):
        """Weighted RMSNorm, computed in high precision and stored in the activation dtype (§2.5)."""
        xf = self.hp(x)
        return self.act(self.hp(w) * (xf * self.rsqrt(self.mean(xf * xf, -1, keepdims=True) + eps)))

    def head_rms(self, x, eps):
        """Weightless RMS over the last axis (per-head q normalization, §3.1)."""
        xf = self.hp(x)
        return self.act(xf * self.rsqrt(self.mean(xf * xf, -1, keepdims=True) + eps))

    def rope(self, x, cos, sin):
        """Interleaved-pair rotation of the last 2·cos.shape[-1] dims of x (§3.2); the rest is untouched.

        cos/sin broadcast against x[..., 0::2] of the rotated part; pass −sin for the inverse rotation."""
        r2 = cos.shape[-1]
        d = x.shape[-1]
        lead = list(x.shape[:-1])
        nope, rot = x[..., : d - 2 * r2], self.hp(x[..., d - 2 * r2:])
        pairs = self.reshape(rot, lead + [r2, 2])
        x0, x1 = pairs[..., 0], pairs[..., 1]
        y0 = x0 * cos - x1 * sin
        y1 = x0 * sin + x1 * cos
        y = self.reshape(self.concat([self.reshape(y0, lead + [r2, 1]), self.reshape(y1, lead + [r2, 1])], -1),
                         lead + [2 * r2])
        return self.concat([nope, self.act(y)], -1)

    def linear(self, x, w):
        """y = x Wᵀ.  Backends replace this with their quantized matmul."""
        return self.matmul(x, self.transpose(self.dense(w), (1, 0)))

    def grouped_linear(self, x, w, groups):
        """Per-group projection of wo_a (§3.6): x [..., G, K], w [G·R, K] → [..., G, R]."""
        wd = self.dense(w)
        gr, k = wd.shape
        wg = self.reshape(wd, [groups, gr // groups, k])                  # [G, R, K]
        lead = list(x.shape[:-2])
        xt = self.reshape(x, [-1, groups, k])                              # [N, G, K]
        y = self.matmul(self.transpose(xt, (1, 0, 2)), self.transpose(wg, (0, 2, 1)))   # [G, N, R]
        return self.reshape(self.transpose(y, (1, 0, 2)), lead + [groups, gr // groups])

    # ------------------------------------------------------------------ mHC (§2.3, §2.4)
    def hc_pre(self, h, fn, base, scale, iters, hc_eps, norm_eps):
        """Collapse hc residual streams into one sub-layer input; returns (x, post, comb)."""
        b, s, hc, d = h.shape
        v = self.hp(self.reshape(h, [b, s, hc * d]))
        rho = self.rsqrt(self.mean(v * v, -1, keepdims=True) + norm_eps)
        mix = self.matmul(v, self.transpose(self.hp(fn), (1, 0))) * rho    # [B,S,(2+hc)·hc]
        pre = self.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + hc_eps
        post = 2.0 * self.sigmoid(mix[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
        c = self.reshape(mix[..., 2 * hc:] * scale[2] + base[2 * hc:], [b, s, hc, hc])
        comb = self.sinkhorn(c, iters, hc_eps)
        x = self.sum(self.reshape(pre, [b, s, hc, 1]) * self.hp(h), 2)
        return self.act(x), post, comb

    def sinkhorn(self, c, iters, eps):
        m = self.softmax(c, -1) + eps
        m = m / (self.sum(m, -2, keepdims=True) + eps)
        for _ in range(iters - 1):
            m = m / (self.sum(m, -1, keepdims=True) + eps)
            m = m / (self.sum(m, -2, keepdims=True) + eps)
        return m

    def hc_post(self, f, res, post, comb):
        """Expand: h_new[k] = post_k·f + Σ_j comb[j,k]·res[j]."""
        b, s, hc, d = res.shape
        mixed = self.matmul(self.transpose(comb, (0, 1, 3, 2)), self.hp(res))          # [B,S,hc,D]
        return self.act(self.reshape(post, [b, s, hc, 1]) * self.reshape(self.hp(f), [b, s, 1, d]) + mixed)

    def hc_head(self, h, fn, base, scale, hc_eps, norm_eps):
        b, s, hc, d = h.shape
        v = self.hp(self.reshape(h, [b, s, hc * d]))
        rho = self.rsqrt(self.mean(v * v, -1, keepdims=True) + norm_eps)
        m = self.matmul(v, self.transpose(self.hp(fn), (1, 0))) * rho
        w = self.sigmoid(m * scale[0] + base) + hc_eps
        return self.act(self.sum(self.reshape(w, [b, s, hc, 1]) * self.hp(h), 2))

    # ------------------------------------------------------------------ attention (§3.4)
    def sink_attention(self, q, segments, sink, scale):
        """Softmax attention of q [B,S,H,d] over the union of `segments` (values = keys), with a per-head
        sink logit [H] that only enlarges the denominator.  One softmax spans all segments, so the window,
        the step's own rows and the stored entries are attended without concatenating them."""
        b, s, h, d = q.shape
        qh = self.hp(q)
        parts = []
        for seg in segments:
            kv, per_query = seg.rows(self)
            kvh = self.hp(kv)
            if per_query:                                                    # kv [B,S,K,d]
                n = kv.shape[2]
                sc = self.matmul(qh, self.transpose(kvh, (0, 1, 3, 2)))      # [B,S,H,K]
            else:                                                            # kv [B,N,d]
                n = kv.shape[1]
                sc = self.reshape(self.matmul(self.reshape(qh, [b, s * h, d]), self.transpose(kvh, (0, 2, 1))),
                                  [b, s, h, n])
            valid = self.reshape(seg.valid(self), [b, s, 1, n])
            parts.append((kvh, per_query, n, self.where(valid, sc * scale, NEG_INF)))
        sc = self.concat([p[3] for p in parts], -1) if len(parts) > 1 else parts[0][3]
        sk = self.reshape(self.hp(sink), [1, 1, h, 1])
        mx = self.maximum(self.max(sc, -1, keepdims=True), sk)
        e = self.exp(sc - mx)
        p = self.act(e / (self.sum(e, -1, keepdims=True) + self.exp(sk - mx)))
        out, off = None, 0
        for kvh, per_query, n, _ in parts:
            pp = p[..., off:off + n]
            off = off + n
            if per_query:
                y = self.matmul(pp, kvh)                                                   # [B,S,H,d]
            else:
                y = self.reshape(self.matmul(self.reshape(pp, [b, s * h, n]), kvh), [b, s, h, d])
            out = y if out is None else out + y
        return self.act(out)

    # ------------------------------------------------------------------ lightning indexer (§4.3)
    def indexer_topk(self, qi, w, segments, k):
        """Top-k key rows per query among the visible ones, over several key segments at once.

        qi [B,S,nh,c], w [B,S,nh] (already scaled); `segments` = [(keys [B,N,c], count [B,S])]: query s
        sees rows < count[b,s] of each.  Rows are ranked as if the segments were concatenated in order
        (ties → the earlier row).  Returns one index array [B,S,k] per segment: the picks that fall in that
        segment, −1 elsewhere and where fewer than k rows are visible."""
        b, s, nh, c = qi.shape
        qh, wh = self.hp(qi), self.reshape(self.hp(w), [b * s, 1, nh])
        scores = []
        for keys, count in segments:
            n = keys.shape[1]
            # one GEMM over all (query, head) rows, then the head-weighted sum as a batched [1,nh]·[nh,N]
            sc = self.matmul(self.reshape(qh, [b, s * nh, c]), self.transpose(self.hp(keys), (0, 2, 1)))
            sc = self.reshape(self.relu(sc), [b * s, nh, n])
            # a rank holds some heads: their weighted sum is summed over ranks before anything is selected
            score = self.all_reduce(self.reshape(self.matmul(wh, sc), [b, s, n]))       # [B,S,N]
            j = self.reshape(self.arange(n), [1, 1, n])
            scores.append(self.where(j < self.reshape(count, [b, s, 1]), score, NEG_INF))
        allsc = self.concat(scores, -1) if len(scores) > 1 else scores[0]
        total = allsc.shape[-1]
        sel = self.topk(allsc, min(k, total) if isinstance(total, int) else k)
        sel = self.where(self.take_along_axis(allsc, sel, -1) > NEG_INF, sel, -1)
        out, off = [], 0
        for sc in scores:
            r = sel - off                                                    # −1 picks stay negative
            out.append(self.where(r >= 0, self.where(r < sc.shape[-1], r, -1), -1))
            off = off + sc.shape[-1]
        return out

    # ------------------------------------------------------------------ compressor pooling (§4.1)
    def compress_pool(self, kv, gate):
        """Per-channel softmax pooling over the slot axis (-2): kv, gate [..., slots, c] → [..., c]."""
        return self.sum(self.softmax(gate, -2) * kv, -2)

    # ------------------------------------------------------------------ MoE (§6)
    def expert(self, x, w1, w2, w3, limit, coef=None):
        """Clamped SwiGLU expert; `coef` [N] (the routing weight) is applied before w2 as in [OFF]."""
        g = self.minimum(self.hp(self.linear(x, w1)), limit)
        u = self.minimum(self.maximum(self.hp(self.linear(x, w3)), -limit), limit)
        a = g * self.sigmoid(g) * u
        if coef is not None:
            a = a * self.reshape(coef, [-1, 1])
        return self.hp(self.linear(self.act(a), w2))

    def moe(self, x, idx, wts, experts, limit):
        """Σ_k wts[:,k]·Expert_{idx[:,k]}(x) over routed experts.  x [N,D], idx/wts [N,k]; idx −1 = skip
        (in a parallel run: an expert another rank holds; ids index `experts`, the rank's own).

        `experts` is the backend's expert container; the default indexes it as experts[e] = (w1, w2, w3)
        and runs every expert densely with a zero weight for unrouted tokens (traceable, fine for small E)."""
        out = None
        for e in range(len(experts)):
            coef = self.sum(self.where(idx == e, wts, 0.0), -1)
            y = self.expert(x, *experts[e], limit, coef=coef)
            out = y if out is None else out + y
        return out


def yarn_inv_freq(rot_dim: int, base: float, yarn: dict | None) -> list[float]:
    """RoPE inverse frequencies for `rot_dim` rotated dims, with V4's YaRN blend when `yarn` is given (§3.2)."""
    half = rot_dim // 2
    inv = [base ** (-2.0 * p / rot_dim) for p in range(half)]
    if not yarn:
        return inv
    factor = float(yarn.get("factor", 16))
    orig = float(yarn.get("original_max_position_embeddings", 65536))

    def corr(n_rot):
        return rot_dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(float(yarn.get("beta_fast", 32)))), 0)
    high = min(math.ceil(corr(float(yarn.get("beta_slow", 1)))), rot_dim - 1)
    if low == high:
        high += 0.001
    out = []
    for p in range(half):
        ramp = min(max((p - low) / (high - low), 0.0), 1.0)
        smooth = 1.0 - ramp
        out.append(inv[p] / factor * (1 - smooth) + inv[p] * smooth)
    return out

"""Distances between a subject's logits and the float64 truth's, on real (unmasked) positions only.

Every metric is "lower is better" so that one tolerance rule judges them all. ``position_stats``
works in one chunked
pass over positions, on whatever device the subject lives on, without ever materialising a
float64 copy of the subject or any other full-size temporary.  Per chunk of ``R`` positions it
keeps three ``(R, vocab)`` float64 work buffers (reused from chunk to chunk); only per-position
vectors (length N) are brought back to the CPU at the end.

Numerics (why this is accurate to ~1e-9 relative even for KL ~ 1e-14)
--------------------------------------------------------------------
Write ``t`` for the truth row, ``s`` for the subject row (any float dtype), ``d = s - t`` computed
in float64 (bitwise the same ``a - b`` as today's float64 implementation), ``p`` = softmax(t) and
``t*`` = argmax(t).  Then exactly

    KL(p_t || p_s) = log E_p[exp(d)] - E_p[d]                                   (1)

and the right-hand side is invariant to shifting ``d`` by a constant.  A float32 subject that is
just the rounded truth has |d| ~ 1e-7 and KL ~ 1e-14, so evaluating (1) -- or today's
sum p (log p_t - log p_s) -- naively cancels catastrophically (today's float64 result carries an
absolute error of ~1e-16..1e-14 for that reason, i.e. 1e-3..1e-1 relative).  We therefore

* centre: ``e = d - d[t*]`` (so e[t*] = 0 exactly and the centred values are O(std of d));
* use weights ``w = exp(t - max t)`` with the argmax weight (exactly 1) held out, so that
  ``Zm1 = sum_{j != t*} w_j`` is relative-accurate and ``log Z = log1p(Zm1)`` is accurate even for
  very peaked rows (today's log_softmax rounds ``Z = 1 + tiny`` and loses the tiny part);
* evaluate ``K(e) = log E_p[exp e] - E_p[e]`` by one of three formulas, chosen per row:

  - **series** (rows with max|e| <= SERIES_MAX_E = 1e-2, e.g. every float32 subject): the
    cumulant expansion ``K = k2/2 + k3/6 + k4/24 + O(max|e|^5)`` with the central moments built
    from the weighted raw moments of ``e`` (four weighted sums, no transcendental function).  The
    neglected terms are below ~max|e|^3/60 relative to K (the two-point distribution with a small
    mass at |e| = max|e| is the worst case), i.e. < 2e-8 for max|e| <= 1e-2;
  - **exp** (larger |e|, e.g. bf16/fp16 subjects): ``A = E_p[exp(e) - 1] = (sum w exp(e) - Zm1)/Z``
    and ``K = log1p(A) - E_p[e]``; the absolute error is a few ulp, so the result is kept only when
    K >= EXP_MIN_KL (relative error <= ~1e-8) and otherwise recomputed with
  - **expm1**: ``A = E_p[expm1(e)]`` (no cancellation at all, relative error ~ eps / std(e)).

  Rows whose |d| is so large that exp could overflow (max|e| > 600), or whose results are not
  finite, are recomputed with today's float64 log_softmax formula on that row only.

Log-probabilities: ``log p_t(j) = (t_j - max t) - log1p(Zm1)`` and, with
``log E_p[exp e] = K + E_p[e]``, ``log p_s(j) = log p_t(j) + e_j - log E_p[exp e]``
(so ``log p_s(t*) - log p_t(t*) = -log E_p[exp e]`` is obtained without cancellation).

Everything else (max|d|, sums of squares, argmax, top-k) is computed on exactly the same values as
today, so those results are equal (max|d| bitwise, sums up to float64 summation order).  Argmax
and top-k work on each side's own values (a bf16 -> float64 conversion is exact and keeps every
order relation) with an exact two-stage top-k (see ``_top``); rows with a tie at the top or at
the k-th place are resolved by ``torch.argmax`` / ``torch.topk`` on the row, as today.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TOP_K = 5

METRICS = {
    "max_abs": "max |logit_subject - logit_truth| over positions and vocabulary",
    "rel_l2": "||a - b||_2 / ||b||_2 over all compared logits",
    "nmse": "mean((a - b)^2) / mean(b^2)",
    "kl_mean": "mean over positions of KL(p_truth || p_subject) of the next-token distribution (nats)",
    "kl_p99": "99th percentile of the per-position KL (nats)",
    "kl_max": "largest per-position KL (nats)",
    "top1_disagree": "fraction of positions whose argmax differs",
    "topk_miss": f"fraction of positions where either side's argmax is outside the other's top-{TOP_K}",
    "logprob_diff_max": "max |log p_subject(t) - log p_truth(t)| for t = the truth's argmax token",
}

# Row-path thresholds (see module docstring).
SERIES_MAX_E = 1e-2     # series path if max|e| <= this; truncation error <~ SERIES_MAX_E^3/60 rel.
SERIES3_MAX_E = 2e-4    # ... and 3rd order is enough below this (error <~ SERIES3_MAX_E^2/12 rel.)
EXP_MIN_KL = 1e-6       # exp-path KL kept only above this (abs. error ~1e-15 -> rel. <= ~1e-9)
EXP_MAX_E = 600.0       # above this exp(e) may overflow: exact per-row fallback

# Default chunk size, as the bytes of one (R, vocab) float64 work buffer: 4 MiB per intra-op
# thread (16 rows of a 32000 vocab per thread), at most 32 MiB.  Measured on this 2-core EPYC
# (1 MiB L2 per core, 32 MiB shared L3), 4x512x32000 float32 vs float64, bench_metrics.py --sweep:
# 1 thread is best at 8-16 rows (11-12 ns/logit; 32 rows +12 %, 128 rows +40 %), 2 threads at 32
# rows (6.1 ns; 16 rows +20 %, 8 rows +60 %): each chunk costs ~100 small torch calls plus an
# OpenMP fork/join per big one, so more threads need more rows per call to amortise them, while
# the three work buffers and the input rows (~4.5x one buffer) must stay in the L3 cache.
# Peak extra memory is therefore ~5 buffers: ~20 MiB at 1 thread, ~40 MiB at 2, <= ~170 MiB.
CPU_CHUNK_BYTES_PER_THREAD = 4 << 20
CPU_CHUNK_BYTES_MAX = 32 << 20
GPU_CHUNK_BYTES = 32 << 20
MAX_CHUNK_ROWS = 4096
TOPK_BLOCK = 128        # block length of the two-stage exact top-k (see _top)


@dataclass
class PositionStats:
    """Per-position statistics for the N real (unmasked) positions, in batch*seq order (CPU)."""
    kl: Tensor                # KL(p_truth || p_subject), nats, clamped >= 0 (float64)
    max_abs: Tensor           # max over vocab |a - b|
    sq_err: Tensor            # sum over vocab (a - b)^2
    sq_truth: Tensor          # sum over vocab b^2
    argmax_s: Tensor          # int64
    argmax_t: Tensor          # int64
    margin_t: Tensor          # truth's top-1 minus top-2 logit (NaN when vocab == 1)
    margin_s: Tensor          # subject's top-1 minus top-2 logit
    topk_s_has_t: Tensor      # bool: truth argmax within subject's top-k
    topk_t_has_s: Tensor      # bool: subject argmax within truth's top-k
    lp_s_at_t: Tensor         # log p_subject(truth argmax)
    lp_t_at_t: Tensor         # log p_truth(truth argmax)
    lp_s_target: Tensor | None  # log p_subject(target); NaN where the target id is outside [0, V)
    lp_t_target: Tensor | None  # log p_truth(target); idem
    nonfinite: int            # number of non-finite subject logits (then other fields may be NaN)
    positions: Tensor         # (N,) flat index of each real position in batch*seq order
    nonfinite_nan: int = 0    # how many of the non-finite subject logits are NaN
    # log p_s(t*) - log p_t(t*) computed without cancellation (= -log E_p[exp(d - d[t*])]); the
    # plain difference of the two fields above loses ~1e-16*|log p| to rounding.
    lp_diff_at_t: Tensor | None = None

    def __len__(self) -> int:
        return int(self.positions.numel())


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _rowsq(a: Tensor) -> Tensor:
    """Row-wise sum of squares of an (R, V) float64 tensor -> (R,).

    vector_norm is a single vectorised pass (much faster here than a BLAS dot via bmm or than
    (a*a).sum); squaring its square root costs ~1 ulp.
    """
    return torch.linalg.vector_norm(a, 2, -1).square()


def _flat_view(x: Tensor, vocab: int) -> Tensor | None:
    """(..., V) -> (M, V) view without copying, or None if the strides do not allow it."""
    try:
        return x.view(-1, vocab)
    except RuntimeError:
        return None


class _Rows:
    """Fetches rows (positions) of a (..., V) tensor chunk by chunk, copying at most a chunk."""

    def __init__(self, x: Tensor, device: torch.device):
        self.x, self.device = x, device
        self.vocab = x.shape[-1]
        self.flat = _flat_view(x, self.vocab)
        self.lead = tuple(x.shape[:-1])

    def get(self, pos: Tensor, contiguous_run: bool, out: Tensor | None = None) -> Tensor:
        """Rows at flat positions ``pos`` (CPU int64, increasing); ``out``: buffer for a gather."""
        if self.flat is not None and contiguous_run:
            rows = self.flat[int(pos[0]): int(pos[-1]) + 1]
        elif self.flat is not None:
            idx = pos.to(self.x.device)
            if out is not None and out.device == self.x.device and out.dtype == self.x.dtype:
                rows = torch.index_select(self.flat, 0, idx, out=out[: idx.numel()])
            else:
                rows = self.flat.index_select(0, idx)
        else:  # non-viewable layout (e.g. a slice of a larger tensor): advanced indexing per chunk
            idx = torch.unravel_index(pos, self.lead)
            rows = self.x[tuple(i.to(self.x.device) for i in idx)]
        return rows.to(self.device, non_blocking=True) if rows.device != self.device else rows


class _Workspace:
    """Reusable (R, V) float64 work buffers (avoids re-allocating -- and page-faulting -- per chunk)."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, r: int, dtype: torch.dtype = torch.float64) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = torch.empty(self.rows, self.vocab, dtype=dtype, device=self.device)
            self._bufs[name] = buf
        return buf[:r]


def default_chunk(vocab: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk so that one float64 work buffer is CPU_CHUNK_BYTES_PER_THREAD times
    torch.get_num_threads() (capped at CPU_CHUNK_BYTES_MAX), or GPU_CHUNK_BYTES off the CPU."""
    if torch.device(device).type == "cpu":
        target = min(CPU_CHUNK_BYTES_MAX, CPU_CHUNK_BYTES_PER_THREAD * torch.get_num_threads())
    else:
        target = GPU_CHUNK_BYTES
    return int(max(1, min(MAX_CHUNK_ROWS, target // (8 * max(vocab, 1)))))


def _top(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-k set, top values and argmax of each row, as torch.topk / torch.argmax give them.

    Returns (values (R, K1) sorted descending with K1 = min(k+1, V), topk_indices (R, k) -- the
    index set torch.topk(x, k) returns --, argmax (R,) -- torch.argmax's first maximal index).

    torch.topk on CPU sorts (value, index) pairs of the whole row (~3 ns per element here).  We
    instead take the maximum of each block of TOPK_BLOCK elements (one vectorised pass), pick the
    K1 blocks with the largest maxima and run topk on their K1*TOPK_BLOCK elements only.  The
    K1 largest values of those candidates are the K1 largest values of the row (a block holding
    one of them either is picked, or K1 picked blocks have maxima at least as large).  Hence
    where values[k-1] > values[k] the top-k set is unique and ours is exactly torch.topk's, and
    where values[0] > values[1] the argmax is unique.  Rows with a tie at either place (or NaN)
    are recomputed with torch.topk / torch.argmax on the row itself, so ties resolve as today.
    """
    R, V = x.shape
    K1 = min(k + 1, V)
    bs = TOPK_BLOCK
    nb = V // bs
    if nb >= 4 * K1 and x.stride(-1) == 1:
        bmax = x[:, :nb * bs].view(R, nb, bs).amax(-1)
        tail = V - nb * bs
        if tail:                                          # the ragged end is one more block
            bmax = torch.cat([bmax, x[:, nb * bs:].amax(-1, keepdim=True)], 1)
        blocks = torch.topk(bmax, K1, -1).indices
        cand = (blocks[:, :, None] * bs
                + torch.arange(bs, device=x.device)).view(R, K1 * bs)
        if tail:
            beyond = cand >= V
            cvals = x.gather(1, cand.clamp_max(V - 1)).masked_fill_(beyond, -math.inf)
        else:
            cvals = x.gather(1, cand)
        vals, j = torch.topk(cvals, K1, -1)
        idx = cand.gather(1, j)
    else:
        vals, idx = torch.topk(x, K1, -1)
    top_idx = idx[:, :k]
    if K1 > k:                                            # boundary tie: set not unique
        amb = ~(vals[:, k - 1] > vals[:, k])
        if bool(amb.any()):
            rows = amb.nonzero().view(-1)
            top_idx = top_idx.clone()
            top_idx[rows] = torch.topk(x.index_select(0, rows), k, -1).indices
    first = idx[:, 0].clone()
    if K1 >= 2:
        tie = ~(vals[:, 0] > vals[:, 1])
        if bool(tie.any()):
            rows = tie.nonzero().view(-1)
            first[rows] = x.index_select(0, rows).argmax(-1)
    return vals, top_idx, first


# --------------------------------------------------------------------------------------------
# per-row KL kernels, all on centred e (e[t*] = 0) and weights w (w[t*] = 0 held out, Z = 1 + Zm1)
# --------------------------------------------------------------------------------------------

def _kl_series(E: Tensor, W: Tensor, Z: Tensor, tmp: Tensor, order4: bool = True
               ) -> tuple[Tensor, Tensor]:
    """Cumulant series: returns (K, E_p[e]) for rows with small max|e|.

    Raw weighted moments r_n = E_p[e^n] (the held-out argmax term contributes e^n = 0), then
    k2 = mu2, k3 = mu3, k4 = mu4 - 3 mu2^2 from the central moments mu_n, and
    K = k2/2 + k3/6 (+ k4/24 if order4).  Dropped terms are O(max|e|^2) (order 3) or
    O(max|e|^3) (order 4) relative to K.
    """
    we = torch.mul(W, E, out=tmp)                       # w e
    r1 = we.sum(-1) / Z
    r2 = we.mul_(E).sum(-1) / Z                         # sum w e^2
    r3 = we.mul_(E).sum(-1) / Z                         # sum w e^3
    r1sq = r1 * r1
    mu2 = r2 - r1sq
    mu3 = r3 - 3.0 * r1 * r2 + 2.0 * r1sq * r1
    kl = mu2 / 2.0 + mu3 / 6.0
    if order4:
        r4 = we.mul_(E).sum(-1) / Z                     # sum w e^4
        mu4 = r4 - 4.0 * r1 * r3 + 6.0 * r1sq * r2 - 3.0 * r1sq * r1sq
        kl = kl + (mu4 - 3.0 * mu2 * mu2) / 24.0
    return kl, r1


def _kl_exp(E: Tensor, W: Tensor, Z: Tensor, Zm1: Tensor, tmp: Tensor) -> tuple[Tensor, Tensor]:
    """exp path: A = E_p[exp(e) - 1] = (sum_{j!=t*} w_j exp(e_j) - Zm1) / Z; K = log1p(A) - E_p[e]."""
    r1 = torch.mul(W, E, out=tmp).sum(-1) / Z
    g = torch.exp(E, out=tmp)
    A = (g.mul_(W).sum(-1) - Zm1) / Z
    return torch.log1p(A) - r1, r1


def _kl_expm1(E: Tensor, W: Tensor, Z: Tensor, tmp: Tensor) -> tuple[Tensor, Tensor]:
    """expm1 path: A = E_p[expm1(e)] (all terms accurate), K = log1p(A) - E_p[e]."""
    r1 = torch.mul(W, E, out=tmp).sum(-1) / Z
    g = torch.expm1(E, out=tmp)
    A = g.mul_(W).sum(-1) / Z
    return torch.log1p(A) - r1, r1


def _subset(rows: Tensor, *xs: Tensor) -> list[Tensor]:
    return [x.index_select(0, rows) for x in xs]


# --------------------------------------------------------------------------------------------
# one chunk
# --------------------------------------------------------------------------------------------

def _chunk_stats(s: Tensor, t: Tensor, tgt: Tensor | None, k: int, ws: _Workspace) -> dict:
    r, V = s.shape
    f64 = torch.float64
    if t.dtype != f64:                                  # float32 (or other) truth: widen this chunk
        t = ws.get("t", r).copy_(t)

    # ---- argmax / top-k on each side's own values (no conversion needed: same order) ----
    vt, it_k, at = _top(t, k)
    vs, is_k, as_ = _top(s, k)
    mt = vt[:, 0]
    if V >= 2:
        margin_t = vt[:, 0] - vt[:, 1]
        margin_s = vs[:, 0].to(f64) - vs[:, 1].to(f64)
    else:
        margin_t = torch.full((r,), math.nan, dtype=f64, device=s.device)
        margin_s = margin_t.clone()
    s_has_t = (is_k == at[:, None]).any(-1)
    t_has_s = (it_k == as_[:, None]).any(-1)

    # ---- differences: d = a - b in float64, exactly today's values ----
    # (widen into the preallocated buffer, then subtract in place: torch.sub(s, t, out=D) would
    # allocate a fresh float64 copy of s each chunk -- and page-fault it in -- before subtracting)
    D = ws.get("D", r).copy_(s).sub_(t)
    max_abs = torch.maximum(D.amax(-1), D.amin(-1).neg())   # NaN-propagating, = |d|.max()
    sq_err = _rowsq(D)
    sq_truth = _rowsq(t)

    # ---- truth weights w = exp(t - max t), argmax weight (== 1) held out ----
    # W holds w * exp(mt) = exp(t) when -30 <= max t <= 80 (saves the t - max t pass; nothing
    # over- or underflows harmfully: W exp(e) <= e^(80 + EXP_MAX_E) on the exp path, and exp(t_j)
    # only goes subnormal where w_j < e^-678); the kernels only use W with its own normalisers
    # ``Zw = sum W`` and ``Zw_m1 = sum_{j != t*} W``, so the scale cancels.
    W = ws.get("W", r)
    at_col = at[:, None]
    if bool(((mt >= -30.0) & (mt <= 80.0)).all()):
        torch.exp(t, out=W)
        w_scale = torch.exp(-mt)                         # W * w_scale = w
    else:
        torch.sub(t, mt[:, None], out=W).exp_()
        w_scale = torch.ones_like(mt)
    W.scatter_(1, at_col, 0.0)
    Zw_m1 = W.sum(-1)
    Zm1 = Zw_m1 * w_scale                                # sum_{j != t*} exp(t_j - max t)
    Z = 1.0 + Zm1
    Zw = Z / w_scale
    log_z = torch.log1p(Zm1)

    # ---- centre the differences on the truth argmax: e = d - d[t*], e[t*] = 0 ----
    E = D.sub_(D.gather(1, at_col))
    tmp = ws.get("tmp", r)

    kl = torch.empty(r, dtype=f64, device=s.device)
    r1 = torch.empty(r, dtype=f64, device=s.device)
    bound = 2.0 * max_abs                                # >= max|e| since |d[t*]| <= max|d|
    series = bound <= SERIES_MAX_E
    expok = (bound <= EXP_MAX_E) & ~series               # False for NaN/Inf rows
    n_series = int(series.sum())
    if n_series:
        # 3rd order suffices (error <= max|e|^2/12 relative) when every series row is tiny
        order4 = bool((torch.where(series, bound, 0.0) > SERIES3_MAX_E).any())
    if n_series == r:
        kl, r1 = _kl_series(E, W, Zw, tmp, order4)
    elif n_series:
        rows = series.nonzero().view(-1)
        Es, Ws = _subset(rows, E, W)
        kl[rows], r1[rows] = _kl_series(Es, Ws, Zw[rows], torch.empty_like(Es), order4)
    n_exp = int(expok.sum())
    if n_exp:
        if n_exp == r:
            kl, r1 = _kl_exp(E, W, Zw, Zw_m1, tmp)
        else:
            rows = expok.nonzero().view(-1)
            Es, Ws = _subset(rows, E, W)
            kl[rows], r1[rows] = _kl_exp(Es, Ws, Zw[rows], Zw_m1[rows], torch.empty_like(Es))
        # small KLs: the exp path's few-ulp absolute error is too large relative -> expm1 path
        small = expok & ~(kl >= EXP_MIN_KL)
        if bool(small.any()):
            rows = small.nonzero().view(-1)
            Es, Ws = _subset(rows, E, W)
            kl[rows], r1[rows] = _kl_expm1(Es, Ws, Zw[rows], torch.empty_like(Es))

    log_m = kl + r1                                      # log E_p[exp e] = log Z_s - log Z_t - d[t*]
    lp_t_at_t = -log_z
    lp_s_at_t = lp_t_at_t - log_m
    lp_diff = -log_m
    out = dict(max_abs=max_abs, sq_err=sq_err, sq_truth=sq_truth, argmax_s=as_, argmax_t=at,
               margin_t=margin_t, margin_s=margin_s, topk_s_has_t=s_has_t, topk_t_has_s=t_has_s)
    if tgt is not None:
        valid = (tgt >= 0) & (tgt < V)
        tg = tgt.clamp(0, V - 1)[:, None]
        lp_t_tg = (t.gather(1, tg).view(-1) - mt) - log_z
        lp_s_tg = lp_t_tg + (E.gather(1, tg).view(-1) - log_m)

    # ---- rows needing today's direct formula (huge |d|, non-finite truth or results) ----
    fallback = ~(series | expok) | ~torch.isfinite(log_m)
    nonfinite = torch.zeros((), dtype=torch.int64, device=s.device)
    nonfinite_nan = torch.zeros((), dtype=torch.int64, device=s.device)
    if bool(fallback.any()):
        rows = fallback.nonzero().view(-1)
        srows = s.index_select(0, rows)
        fin = torch.isfinite(srows)
        nonfinite = (~fin).sum()
        nonfinite_nan = torch.isnan(srows).sum()
        la = torch.log_softmax(srows.to(f64), -1)
        lb = torch.log_softmax(t.index_select(0, rows), -1)
        kl_f = (lb.exp() * (lb - la)).sum(-1)
        bad_row = ~fin.all(-1)                           # non-finite subject row: NaN, like today
        kl_f = torch.where(bad_row, torch.full_like(kl_f, math.nan), kl_f)
        kl[rows] = kl_f
        a_col = at.index_select(0, rows)[:, None]
        lp_t_at_t[rows] = lb.gather(1, a_col).view(-1)
        lp_s_at_t[rows] = la.gather(1, a_col).view(-1)
        lp_diff[rows] = lp_s_at_t[rows] - lp_t_at_t[rows]
        if tgt is not None:
            tgr = tg.index_select(0, rows)
            lp_t_tg[rows] = lb.gather(1, tgr).view(-1)
            lp_s_tg[rows] = la.gather(1, tgr).view(-1)
    out.update(kl=kl.clamp_min(0.0), lp_s_at_t=lp_s_at_t, lp_t_at_t=lp_t_at_t, lp_diff_at_t=lp_diff,
               nonfinite=nonfinite, nonfinite_nan=nonfinite_nan)
    if tgt is not None:
        nan = torch.full_like(lp_t_tg, math.nan)
        out.update(lp_s_target=torch.where(valid, lp_s_tg, nan),
                   lp_t_target=torch.where(valid, lp_t_tg, nan))
    return out


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

_VECTOR_FIELDS = ("kl", "max_abs", "sq_err", "sq_truth", "argmax_s", "argmax_t", "margin_t",
                  "margin_s", "topk_s_has_t", "topk_t_has_s", "lp_s_at_t", "lp_t_at_t",
                  "lp_diff_at_t")


def position_stats(subject: Tensor, truth: Tensor, mask: Tensor | None = None,
                   targets: Tensor | None = None, top_k: int = TOP_K,
                   chunk: int | None = None) -> PositionStats:
    """Per-position statistics of subject vs truth logits on real (unmasked) positions.

    subject, truth: (..., vocab), same shape; subject any float dtype on any device, truth
    float64 (float32 accepted; it is widened chunk by chunk) -- moved chunk-wise to the subject's
    device if elsewhere.  mask: leading-dims-shaped bool/0-1, or None (all positions real).
    targets: leading-dims-shaped next-token ids, or None.  chunk: positions per chunk (default
    from ``default_chunk``).  Work happens on the subject's device; results come back as CPU
    tensors of length N.
    """
    subject, truth = subject.detach(), truth.detach()
    if subject.shape != truth.shape:
        raise ValueError(f"logit shapes differ: {tuple(subject.shape)} vs {tuple(truth.shape)}")
    if subject.dim() < 1 or not subject.is_floating_point() or not truth.is_floating_point():
        raise ValueError("subject and truth must be floating-point (..., vocab) tensors")
    V = subject.shape[-1]
    lead = tuple(subject.shape[:-1])
    M = math.prod(lead)
    device = subject.device
    if mask is None:
        positions = torch.arange(M, dtype=torch.int64)
    else:
        m = mask.detach().to("cpu")
        if tuple(m.shape) != lead:
            raise ValueError(f"mask shape {tuple(m.shape)} does not match logits {lead}")
        positions = m.reshape(-1).bool().nonzero().view(-1)
    N = int(positions.numel())
    tg_all = None
    if targets is not None:
        tg = targets.detach()
        if tuple(tg.shape) != lead:
            raise ValueError(f"targets shape {tuple(tg.shape)} does not match logits {lead}")
        tg_all = tg.reshape(-1).to("cpu", torch.int64)[positions].to(device)

    k = min(top_k, V)
    if k < 1:
        raise ValueError("top_k must be >= 1")
    R = int(chunk) if chunk else default_chunk(V, device)
    R = max(1, min(R, max(N, 1)))
    ws = _Workspace(R, V, device)
    s_rows, t_rows = _Rows(subject, device), _Rows(truth, device)

    parts: list[dict] = []
    pos_list = positions.tolist() if N else []
    for i0 in range(0, N, R):
        i1 = min(N, i0 + R)
        pos = positions[i0:i1]
        run = pos_list[i1 - 1] - pos_list[i0] == i1 - 1 - i0     # consecutive positions -> slice
        s = s_rows.get(pos, run, None if run else ws.get("s_rows", R, subject.dtype))
        t = t_rows.get(pos, run, None if run else ws.get("t_rows", R, truth.dtype))
        if s.stride(-1) != 1:
            s = s.contiguous()
        if t.stride(-1) != 1:
            t = t.contiguous()
        tgt = tg_all[i0:i1] if tg_all is not None else None
        parts.append(_chunk_stats(s, t, tgt, k, ws))

    def cat(name: str, dtype: torch.dtype) -> Tensor:
        if not parts:
            return torch.empty(0, dtype=dtype)
        return torch.cat([p[name] for p in parts]).to("cpu")

    vec = {f: cat(f, torch.int64 if f.startswith("argmax") else
                  torch.bool if f.startswith("topk") else torch.float64) for f in _VECTOR_FIELDS}
    nonfinite = int(sum(int(p["nonfinite"]) for p in parts))
    nonfinite_nan = int(sum(int(p["nonfinite_nan"]) for p in parts))
    lp_s_tg = cat("lp_s_target", torch.float64) if targets is not None else None
    lp_t_tg = cat("lp_t_target", torch.float64) if targets is not None else None
    return PositionStats(**vec, lp_s_target=lp_s_tg, lp_t_target=lp_t_tg, nonfinite=nonfinite,
                         positions=positions, nonfinite_nan=nonfinite_nan)


def _lp_diff(stats: PositionStats) -> Tensor:
    if stats.lp_diff_at_t is not None:
        return stats.lp_diff_at_t
    return stats.lp_s_at_t - stats.lp_t_at_t


def summarize(stats: PositionStats) -> tuple[dict[str, float], str]:
    """Today's ``compare`` metrics from per-position statistics, plus the non-finite reason."""
    if stats.nonfinite:
        kind = "NaN" if stats.nonfinite_nan else "Inf"
        return ({m: math.nan for m in METRICS},
                f"non-finite subject logits: {stats.nonfinite} values ({kind})")
    if len(stats) == 0:
        raise ValueError("no real (unmasked) positions to compare")
    out = {
        "max_abs": stats.max_abs.max().item(),
        # ||a-b|| / ||b|| and mean((a-b)^2) / mean(b^2) over all compared logits (same count);
        # tensor arithmetic so that an all-zero truth gives inf/NaN as today, not an exception
        "rel_l2": (stats.sq_err.sum().sqrt() / stats.sq_truth.sum().sqrt()).item(),
        "nmse": (stats.sq_err.sum() / stats.sq_truth.sum()).item(),
        "kl_mean": stats.kl.mean().item(),
        "kl_p99": _quantile(stats.kl, 0.99).item(),
        "kl_max": stats.kl.max().item(),
        "top1_disagree": (stats.argmax_s != stats.argmax_t).double().mean().item(),
        "topk_miss": (~(stats.topk_s_has_t & stats.topk_t_has_s)).double().mean().item(),
        "logprob_diff_max": _lp_diff(stats).abs().max().item(),
    }
    return out, ""


def compare(subject: Tensor, truth: Tensor, mask: Tensor | None = None,
            top_k: int = TOP_K, chunk: int | None = None) -> tuple[dict[str, float], str]:
    """Drop-in replacement for harness.metrics.compare (``chunk`` as in position_stats)."""
    return summarize(position_stats(subject, truth, mask, top_k=top_k, chunk=chunk))


def per_position(subject: Tensor, truth: Tensor, chunk: int | None = None) -> dict[str, list[float]]:
    """Drop-in replacement for harness.metrics.per_position ((batch, seq, vocab) inputs)."""
    st = position_stats(subject, truth, chunk=chunk)
    if st.nonfinite:
        return {}
    b, sq = subject.shape[0], subject.shape[1]
    err = st.max_abs.view(b, sq).amax(0)
    kl = st.kl.view(b, sq).amax(0)
    return {"per_position": [float(f"{v:.4g}") for v in err.tolist()],
            "kl_per_position": [float(f"{v:.4g}") for v in kl.tolist()]}


def _quantile(x: Tensor, q: float | list[float]) -> Tensor:
    """torch.quantile (linear interpolation), also past its input-size limit (sort + lerp)."""
    qt = torch.as_tensor(q, dtype=x.dtype)
    if x.numel() <= (1 << 24) - 1:
        return torch.quantile(x, qt)
    v = torch.sort(x).values                              # NaN sorts last -> NaN results, as torch
    if torch.isnan(v[-1]):
        return torch.full_like(qt, math.nan)
    rank = qt * (x.numel() - 1)
    lo, hi = rank.floor().long(), rank.ceil().long()
    return torch.lerp(v[lo], v[hi], rank - lo)


def _quantiles(x: Tensor, qs: dict[str, float]) -> dict[str, float]:
    if x.numel() == 0:
        return {k: math.nan for k in qs}
    v = _quantile(x, list(qs.values()))
    return {k: float(q) for k, q in zip(qs, v.tolist())}


def _mean_se(x: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean: sample std (n - 1) / sqrt(n); NaN for n < 2."""
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    mean = x.mean().item()
    se = x.std(correction=1).item() / math.sqrt(n) if n > 1 else math.nan
    return mean, se


_PCTS = {"p99_9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75, "median": 0.5,
         "p25": 0.25, "p10": 0.10, "p5": 0.05, "p1": 0.01, "p0_1": 0.001}


def corpus_stats(stats: PositionStats, z: float = 1.96) -> dict[str, float]:
    """Corpus-level statistics: llama.cpp ``perplexity --kl-divergence``'s set, and ours.

    Conventions (n = number of positions; "se" = standard error, sample std with n-1 over
    sqrt(n); intervals are estimate +- z*se unless stated):

    * KL (nats, clamped >= 0 per position): kl_mean, kl_mean_se, kl_mean_lo/hi; kl_max, kl_min
      and linear-interpolation quantiles (torch.quantile) kl_p99_9 ... kl_p0_1, kl_median
      (llama.cpp's list: 99.9, 99, 95, 90, median, 10, 5, 1, 0.1 %; we add 75 and 25 %).
    * same_top1: rate of argmax agreement, same_top1_se = sqrt(p(1-p)/n) (normal/Wald, what
      llama.cpp prints) and same_top1_lo/hi = the Wilson score interval (valid near p = 1).
    * topk_s_has_t / topk_t_has_s / topk_both: top-k containment rates (1 - topk_both is
      compare()'s topk_miss); lp_at_t_absdiff_mean / _max: mean and max over positions of
      |log p_s(t*) - log p_t(t*)| at the truth argmax t*.
    * With targets (positions whose target id is invalid are left out; n_targets counts the
      rest): ppl_subject = exp(mean(-lp_s_target)), ppl_truth likewise, each with the
      delta-method se ppl * se(nll); ln_ppl_ratio = mean(lp_t - lp_s) with its se (paired, so
      the shared per-token noise cancels, as llama.cpp's covariance term does), ppl_ratio =
      exp(ln_ppl_ratio) with se ppl_ratio * se(ln) and interval exp(ln +- z*se);
      ppl_diff = ppl_subject - ppl_truth with the delta-method se (covariance included);
      ln_ppl_corr = Pearson correlation of the per-token log-probs (llama.cpp's
      Cor(ln(PPL(Q)), ln(PPL(base)))); dp = p_s(target) - p_t(target): dp_mean +- se, dp_max,
      dp_min, dp quantiles, rms_dp = sqrt(mean dp^2) with se(mean dp^2) / (2 rms_dp).
      All of these are NaN when the stats carry no targets.
    """
    kl = stats.kl.double()
    n = kl.numel()
    out: dict[str, float] = {"n": float(n)}
    kl_mean, kl_se = _mean_se(kl)
    out.update(kl_mean=kl_mean, kl_mean_se=kl_se, kl_mean_lo=kl_mean - z * kl_se,
               kl_mean_hi=kl_mean + z * kl_se,
               kl_max=kl.max().item() if n else math.nan,
               kl_min=kl.min().item() if n else math.nan)
    out.update(_quantiles(kl, {"kl_" + k: q for k, q in _PCTS.items()}))

    same = (stats.argmax_s == stats.argmax_t).double()
    p = same.mean().item() if n else math.nan
    if n:
        se = math.sqrt(p * (1.0 - p) / n)
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    else:
        se = centre = half = math.nan
    out.update(same_top1=p, same_top1_se=se, same_top1_lo=centre - half,
               same_top1_hi=centre + half)

    s_has_t, t_has_s = stats.topk_s_has_t, stats.topk_t_has_s
    rate = (lambda b: b.double().mean().item() if n else math.nan)  # noqa: E731
    out.update(topk_s_has_t=rate(s_has_t), topk_t_has_s=rate(t_has_s),
               topk_both=rate(s_has_t & t_has_s))
    dlp = _lp_diff(stats).abs()
    out.update(lp_at_t_absdiff_mean=dlp.mean().item() if n else math.nan,
               lp_at_t_absdiff_max=dlp.max().item() if n else math.nan)

    keys = ["n_targets", "ppl_subject", "ppl_subject_se", "ppl_truth", "ppl_truth_se",
            "ln_ppl_ratio", "ln_ppl_ratio_se", "ppl_ratio", "ppl_ratio_se", "ppl_ratio_lo",
            "ppl_ratio_hi", "ppl_diff", "ppl_diff_se", "ln_ppl_corr", "dp_mean", "dp_mean_se",
            "dp_max", "dp_min", "rms_dp", "rms_dp_se"] + ["dp_" + k for k in _PCTS]
    if stats.lp_s_target is None or stats.lp_t_target is None:
        out.update({k: math.nan for k in keys})
        return out
    ls, lt = stats.lp_s_target.double(), stats.lp_t_target.double()
    ok = ~(torch.isnan(ls) | torch.isnan(lt))
    ls, lt = ls[ok], lt[ok]
    nt = ls.numel()
    out["n_targets"] = float(nt)
    if nt == 0:
        out.update({k: math.nan for k in keys[1:]})
        return out
    nll_s, se_s = _mean_se(-ls)
    nll_t, se_t = _mean_se(-lt)
    lr, lr_se = _mean_se(lt - ls)                        # ln(PPL_s / PPL_t), paired per token
    ppl_s, ppl_t, ratio = math.exp(nll_s), math.exp(nll_t), math.exp(lr)
    if nt > 1:
        cs, ct = ls - ls.mean(), lt - lt.mean()
        cov = (cs * ct).sum().item() / (nt - 1)
        den = math.sqrt((cs * cs).sum().item() * (ct * ct).sum().item())
        corr = (cs * ct).sum().item() / den if den > 0 else math.nan
        var_diff = (ppl_s * ppl_s * se_s * se_s + ppl_t * ppl_t * se_t * se_t
                    - 2.0 * ppl_s * ppl_t * cov / nt)
        diff_se = math.sqrt(max(var_diff, 0.0))
    else:
        corr = diff_se = math.nan
    out.update(ppl_subject=ppl_s, ppl_subject_se=ppl_s * se_s, ppl_truth=ppl_t,
               ppl_truth_se=ppl_t * se_t, ln_ppl_ratio=lr, ln_ppl_ratio_se=lr_se,
               ppl_ratio=ratio, ppl_ratio_se=ratio * lr_se,
               ppl_ratio_lo=math.exp(lr - z * lr_se), ppl_ratio_hi=math.exp(lr + z * lr_se),
               ppl_diff=ppl_s - ppl_t, ppl_diff_se=diff_se, ln_ppl_corr=corr)
    dp = ls.exp() - lt.exp()
    dp_mean, dp_se = _mean_se(dp)
    msq, msq_se = _mean_se(dp * dp)
    rms = math.sqrt(msq)
    out.update(dp_mean=dp_mean, dp_mean_se=dp_se, dp_max=dp.max().item(),
               dp_min=dp.min().item(), rms_dp=rms,
               rms_dp_se=msq_se / (2.0 * rms) if rms > 0 else math.nan)
    out.update(_quantiles(dp, {"dp_" + k: q for k, q in _PCTS.items()}))
    return out


__all__ = ["TOP_K", "METRICS", "PositionStats", "position_stats", "summarize", "compare",
           "per_position", "corpus_stats", "default_chunk"]


# --- beyond one comparison: many windows, flips that rounding cannot explain, curves --------------

def cat_stats(parts: list[PositionStats]) -> PositionStats:
    """The statistics of several comparisons (a corpus's windows) as one, positions renumbered."""
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for name in (*_VECTOR_FIELDS, "lp_s_target", "lp_t_target"):
        vals = [getattr(p, name) for p in parts]
        fields[name] = None if any(v is None for v in vals) else torch.cat(vals)
    offset, positions = 0, []
    for p in parts:
        positions.append(p.positions + offset)
        offset += int(p.positions.max()) + 1 if len(p) else 0
    return PositionStats(**fields, nonfinite=sum(p.nonfinite for p in parts), positions=torch.cat(positions),
                         nonfinite_nan=sum(p.nonfinite_nan for p in parts))


BEYOND_ROUNDING = {
    "top1_flips": "positions whose argmax differs where the truth's top-2 margin exceeds what rounding can "
                  "overturn (2 x max_factor x the reference's largest |dlogit| in the cell)",
    "topk_misses": f"the same, for either side's argmax outside the other's top-{TOP_K}",
}

# How the logits and axes suites judge a cell: the near-tie rates are shown, not gated; the flips
# rounding cannot explain (BEYOND_ROUNDING) are what is gated in their place.
RATES = ("top1_disagree", "topk_miss")
GATED = [m for m in METRICS if m not in RATES] + list(BEYOND_ROUNDING)


# Corpus statistics gated like the means they are (harness.suites.logits).
CORPUS_GATED = {"rms_dp": "RMS over positions of p_subject(next token) - p_truth(next token)",
                "lp_at_t_absdiff_mean": "mean |log p_subject(t*) - log p_truth(t*)| at the truth's argmax t*"}
# Paired with the reference position by position (same input, same dtype): a precision regression
# of one code path (cache, head, norm) makes most positions worse, while one cell's extreme is one
# draw; judged against a fixed ratio (suites/tolerance.toml), not against a multiple of the reference.
PAIRED = {"kl_ratio_lo": "lower 3-sigma bound of the geometric mean over "
                         "positions of KL_subject / KL_reference"}
# The cached cell against the same implementation's own full forward (same weights, same dtype):
# the noise of the forward is common to both paths, so what the cache alone does stands out.
CACHE_GAP = {"cache_gap": "KL mean of the cached logits against the same implementation's full forward "
                          "at the same dtype, over the reference's KL mean against the truth on the cell"}
# What a logits tolerance policy may hold (suites/tolerance.toml).
POLICY_METRICS = [*METRICS, *BEYOND_ROUNDING, *CORPUS_GATED, *PAIRED, *CACHE_GAP]
PAIRED_Z = 3.0


def paired_ratio(stats: PositionStats, reference: PositionStats) -> dict[str, float]:
    """kl_ratio_lo: exp(mean - Z sd / sqrt(n)) of log((KL_s + e) / (KL_r + e)) over the positions
    both measured (e: 1% of the reference's median KL, so that exact positions do not divide by
    0). A correct subject's log-ratios centre on ~0 and the bound stays below 1; a path made k
    times less precise moves the whole distribution by log k, which n positions resolve to
    sd / sqrt(n). Also gm (the geometric mean itself) and n, for the reason."""
    if stats.nonfinite or reference.nonfinite or len(stats) != len(reference) or len(stats) == 0:
        return {"kl_ratio_lo": math.nan, "gm": math.nan, "n": len(stats)}
    eps = max(float(reference.kl.median()) * 0.01, 1e-300)
    x = torch.log((stats.kl + eps) / (reference.kl + eps))
    n = int(x.numel())
    mu = float(x.mean())
    sd = float(x.std()) if n > 1 else math.inf
    return {"kl_ratio_lo": math.exp(mu - PAIRED_Z * sd / math.sqrt(n)), "gm": math.exp(mu), "n": n}


def cache_gap(gap: PositionStats, scale: PositionStats) -> float:
    """cache_gap: ``gap`` (cached logits against the same implementation's full forward) as KL mean,
    in units of ``scale``'s KL mean (the reference's cached cell against the float64 truth: what
    rounding at this dtype does on this model and input). A correct cache changes the logits only
    by the rounding of a different order of operations (0 where the kernels match); a cache kept in
    a narrower dtype adds its own rounding at every position, whatever the forward's."""
    if gap.nonfinite or scale.nonfinite or len(gap) == 0:
        return math.nan
    g, s = float(gap.kl.mean()), float(scale.kl.mean())
    if g <= 0:
        return 0.0
    return g / s if s > 0 else math.inf


def beyond_rounding(stats: PositionStats, reference: PositionStats, factor: float) -> dict[str, float]:
    """Flips counted only where they cannot be rounding: a subject whose argmax moves at a position
    whose truth margin exceeds 2 x factor x the reference's worst error has an error there larger
    than factor times anything the reference does at this dtype. Near-ties flip at random with
    every correct implementation; a rate over 16 positions cannot tell one from a bug."""
    if len(stats) == 0 or stats.nonfinite:
        return {m: math.nan for m in BEYOND_ROUNDING}
    rounding = reference.max_abs.max().item() if len(reference) else math.inf
    clear = stats.margin_t > 2 * factor * rounding
    return {"top1_flips": float(((stats.argmax_s != stats.argmax_t) & clear).sum()),
            "topk_misses": float((~(stats.topk_s_has_t & stats.topk_t_has_s) & clear).sum())}


def curves(stats: PositionStats, batch: int, seq: int) -> dict[str, list[float]]:
    """Error along the sequence (max over rows): what grows with position shows here."""
    if stats.nonfinite or len(stats) != batch * seq:
        return {}
    err = stats.max_abs.view(batch, seq).amax(0)
    kl = stats.kl.view(batch, seq).amax(0)
    return {"per_position": [float(f"{v:.4g}") for v in err.tolist()],
            "kl_per_position": [float(f"{v:.4g}") for v in kl.tolist()]}


def corpus_evidence(stats: PositionStats, windows: int, ctx: int) -> dict:
    """For the report's plots: a histogram of log10 KL, and top-1 agreement by position in window."""
    if stats.nonfinite or len(stats) != windows * ctx:
        return {}
    logkl = torch.log10(stats.kl.clamp_min(1e-16))
    edges = torch.linspace(-16, 2, 37, dtype=torch.float64)
    counts = torch.histc(logkl, bins=36, min=-16, max=2)
    same = (stats.argmax_s == stats.argmax_t).double().view(windows, ctx).mean(0)
    return {"kl_log10_edges": [round(float(e), 3) for e in edges.tolist()],
            "kl_log10_counts": [int(c) for c in counts.tolist()],
            "top1_by_position": [round(float(v), 4) for v in same.tolist()]}

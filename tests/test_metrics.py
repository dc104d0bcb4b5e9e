"""harness.core.metrics (the chunked engine) against the straightforward float64 implementation
(tests/metrics_reference.py), direct float64 computations and mpmath.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mpmath
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from harness.core import metrics as fm  # noqa: E402
import metrics_reference as old  # noqa: E402  (the straightforward float64 implementation)

F64 = torch.float64

# Tolerances against today's float64 implementation.  Today's KL sums p (log p_t - log p_s) of
# log-probabilities that each carry ~1e-16 * |log p| of rounding, so its own absolute error is
# ~1e-16..1e-15 (see test_tiny_kl_against_mpmath: it is 1e-3..1e-2 relative on KL ~ 1e-14).
# Where the value is that small we therefore compare absolutely (KL_ATOL); everywhere else the
# relative difference must be <= 1e-6 (observed: <= ~1e-9).
RTOL = 1e-6
KL_ATOL = 4e-15
LP_ATOL = 1e-15


def realistic(b, s, v, seed=0, std=5.0, hidden=64):
    """float64 logits of a random linear head: peaked, LLM-like next-token distributions."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(v, hidden, generator=g, dtype=F64)
    h = torch.randn(b, s, hidden, generator=g, dtype=F64)
    return (h @ head.T) * (std / math.sqrt(hidden))


def noisy(t, rel, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (t + rel * torch.randn(t.shape, generator=g, dtype=F64)).to(dtype)


def assert_compare_equal(new, old_, kl_atol=KL_ATOL):
    assert new.keys() == old_.keys()
    for k, o in old_.items():
        n = new[k]
        if math.isnan(o):
            assert math.isnan(n), k
            continue
        if n == o:                                # includes equal infinities
            continue
        if k in ("max_abs", "top1_disagree", "topk_miss"):
            assert n == o, (k, n, o)
        elif k.startswith("kl"):
            assert abs(n - o) <= max(RTOL * abs(o), kl_atol), (k, n, o)
        elif k == "logprob_diff_max":
            assert abs(n - o) <= max(RTOL * abs(o), LP_ATOL), (k, n, o)
        else:
            assert abs(n - o) <= 1e-12 * abs(o) + 1e-300, (k, n, o)


def old_compare(subject, truth, mask=None, top_k=fm.TOP_K):
    return old.compare(subject, truth, mask, top_k)


# ------------------------------------------------------------------------------------------
# compare(): equality with today's
# ------------------------------------------------------------------------------------------

SUBJECTS = {
    "f32": lambda t: t.float(),
    "bf16": lambda t: t.bfloat16(),
    "f16": lambda t: t.half(),
    "f64_same": lambda t: t.clone(),
    "f32_noise1e-4": lambda t: noisy(t, 1e-4, torch.float32),
    "f32_noise3e-3": lambda t: noisy(t, 3e-3, torch.float32),
    "bf16_noise0.05": lambda t: noisy(t, 0.05, torch.bfloat16),
    "f32_shift": lambda t: (t + 2.5).float(),
    "garbage": lambda t: noisy(t * 0, 5.0, torch.float32),
    "scaled": lambda t: (t * 3.0).float(),        # |d| up to ~100: exp path / fallback rows
    "huge_d": lambda t: (t * 300.0).float(),      # |d| > 600: exact per-row fallback
}


@pytest.mark.parametrize("name", list(SUBJECTS))
@pytest.mark.parametrize("v", [700, 4096])
def test_compare_realistic(name, v):
    t = realistic(3, 37, v, seed=v)
    s = SUBJECTS[name](t)
    assert_compare_equal(fm.compare(s, t)[0], old_compare(s, t)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compare_random(dtype):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 40, 1000, generator=g, dtype=F64) * 2
    s = torch.randn(2, 40, 1000, generator=g, dtype=F64).to(dtype) * 2
    assert_compare_equal(fm.compare(s, t)[0], old_compare(s, t)[0])


def test_compare_32000_vocab():
    t = realistic(1, 24, 32000, seed=5)
    for s in (t.float(), t.bfloat16(), noisy(t, 1e-3, torch.float32)):
        assert_compare_equal(fm.compare(s, t)[0], old_compare(s, t)[0])


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_masks_and_chunks(chunk):
    t = realistic(4, 29, 700, seed=11)
    s = noisy(t, 1e-3, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    masks = [
        torch.ones(4, 29, dtype=torch.bool),
        torch.rand(4, 29, generator=g) > 0.4,                            # scattered
        torch.arange(29)[None, :] < torch.tensor([29, 10, 3, 17])[:, None],  # right padding
        (torch.arange(29)[None, :] >= torch.tensor([0, 5, 20, 28])[:, None]).int(),  # left, 0/1
    ]
    for m in masks:
        new = fm.summarize(fm.position_stats(s, t, m, chunk=chunk))[0]
        assert_compare_equal(new, old_compare(s, t, m)[0])
        st = fm.position_stats(s, t, m, chunk=chunk)
        assert st.positions.tolist() == m.reshape(-1).bool().nonzero().view(-1).tolist()


def test_chunk_invariance():
    t = realistic(2, 45, 700, seed=4)
    s = t.bfloat16()
    ref = fm.position_stats(s, t, chunk=90)
    for chunk in (1, 4, 13, 64):
        st = fm.position_stats(s, t, chunk=chunk)
        for f in fm._VECTOR_FIELDS:
            a, b = getattr(st, f), getattr(ref, f)
            if a.dtype.is_floating_point:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)
            else:
                assert torch.equal(a, b), f


@pytest.mark.parametrize("v", [1, 2, 3, 5, 6, 13, 700, 1001])
def test_odd_vocab_sizes(v):
    t = realistic(2, 9, v, seed=v) if v > 1 else torch.randn(2, 9, 1, dtype=F64)
    for s in (t.float(), noisy(t, 0.1, torch.bfloat16)):
        assert_compare_equal(fm.compare(s, t)[0], old_compare(s, t)[0])


@pytest.mark.parametrize("top_k", [1, 2, 5, 6, 50])
def test_top_k_values(top_k):
    t = realistic(2, 30, 300, seed=top_k)
    s = noisy(t, 0.3, torch.bfloat16)
    assert_compare_equal(fm.compare(s, t, top_k=top_k)[0], old_compare(s, t, top_k=top_k)[0])


def test_float32_truth():
    t64 = realistic(2, 33, 700, seed=8)
    t = t64.float()
    for s in (t.clone(), t.bfloat16(), noisy(t64, 1e-3, torch.float32), t.half()):
        assert_compare_equal(fm.compare(s, t)[0], old_compare(s, t)[0])


def test_flat_and_noncontiguous_inputs():
    t = realistic(3, 21, 700, seed=9)
    s = noisy(t, 1e-2, torch.float32)
    # already flat (N, V)
    assert_compare_equal(fm.compare(s.view(-1, 700), t.view(-1, 700))[0],
                         old_compare(s.view(-1, 700), t.view(-1, 700))[0])
    # a slice that cannot be viewed flat (the usual logits[:, :-1]), with a mask
    ss, tt = s[:, :-1], t[:, :-1]
    assert fm._flat_view(ss, 700) is None
    m = torch.rand(3, 20) > 0.3
    assert_compare_equal(fm.compare(ss, tt, m, chunk=8)[0], old_compare(ss, tt, m)[0])
    # vocab not the innermost stride
    st = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert_compare_equal(fm.compare(s, st)[0], old_compare(s, st)[0])


# ------------------------------------------------------------------------------------------
# argmax / top-k ties
# ------------------------------------------------------------------------------------------

def test_argmax_and_topk_ties():
    t = realistic(1, 200, 2000, seed=21)[0]
    vals, idx = torch.topk(t, 7, -1)
    rows = torch.arange(200)
    # rows 0..49: exact tie of the truth's top-1 and top-2 (first index must win, as argmax)
    t[rows[:50], idx[:50, 1]] = vals[:50, 0]
    # rows 50..99: 1-ulp near-tie
    t[rows[50:100], idx[50:100, 1]] = torch.nextafter(vals[50:100, 0], torch.tensor(-math.inf, dtype=F64))
    # rows 100..149: tie between the 5th and 6th values (top-k set not unique)
    t[rows[100:150], idx[100:150, 5]] = vals[100:150, 4]
    # rows 150..199: three-way tie at the top
    t[rows[150:], idx[150:, 1]] = vals[150:, 0]
    t[rows[150:], idx[150:, 2]] = vals[150:, 0]
    t = t[None]
    # bf16 subjects have many exact ties among the top tokens; coarse rounding makes more
    for s in (t.bfloat16(), (t * 4).round().float() / 4, (t * 2).round().to(torch.bfloat16), t.float()):
        new, ref = fm.compare(s, t)[0], old_compare(s, t)[0]
        assert_compare_equal(new, ref)
        st = fm.position_stats(s, t)
        a, b = s[0].double(), t[0]
        assert torch.equal(st.argmax_s, a.argmax(-1)) and torch.equal(st.argmax_t, b.argmax(-1))
        in_a = (a.topk(5, -1).indices == b.argmax(-1)[:, None]).any(-1)
        in_b = (b.topk(5, -1).indices == a.argmax(-1)[:, None]).any(-1)
        assert torch.equal(st.topk_s_has_t, in_a) and torch.equal(st.topk_t_has_s, in_b)


def test_two_stage_topk_matches_torch_topk():
    g = torch.Generator().manual_seed(5)
    for v in (32000, 1000, 1537, 4 * 6 * 128 + 77):
        x = (torch.randn(64, v, generator=g, dtype=F64) * 3)
        for xx in (x, x.bfloat16(), (x * 2).round().float(), x.half()):
            vals, top_idx, first = fm._top(xx, 5)
            ref = torch.topk(xx, 6, -1)
            torch.testing.assert_close(vals, ref.values)
            assert torch.equal(first, xx.argmax(-1))
            assert torch.equal(top_idx.sort(-1).values, torch.topk(xx, 5, -1).indices.sort(-1).values)


# ------------------------------------------------------------------------------------------
# non-finite subjects
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "both", "masked_out"])
def test_nonfinite_subject(kind):
    t = realistic(2, 10, 700, seed=1)
    s = t.float().clone()
    m = torch.ones(2, 10, dtype=torch.bool)
    if kind == "nan":
        s[0, 3, 5] = math.nan
        s[1, 2, :4] = math.nan
    elif kind == "inf":
        s[1, 7, 9] = math.inf
    elif kind == "-inf":
        s[0, 0, 0] = -math.inf
        s[0, 1, :] = -math.inf
    elif kind == "both":
        s[0, 4, 1] = math.inf
        s[1, 4, 1] = math.nan
    else:                                     # non-finite only where the mask hides it
        s[1, 9, :] = math.nan
        m[1, 9] = False
    new, reason = fm.compare(s, t, m)
    ref, ref_reason = old_compare(s, t, m)
    assert reason == ref_reason
    assert_compare_equal(new, ref)
    if kind != "masked_out":
        assert reason.startswith("non-finite subject logits") and all(math.isnan(x) for x in new.values())
    assert fm.per_position(s, t) == old.per_position(s, t) or kind == "masked_out"


def test_nonfinite_truth_entries_behave_like_today():
    # the truth masks a token with -inf (some models do): today's gives inf / NaN, not a crash
    t = realistic(1, 6, 700, seed=2)
    s = t.float()
    t = t.clone()
    t[0, :, 10] = -math.inf
    new, r1 = fm.compare(s, t)
    ref, r2 = old_compare(s, t)
    assert r1 == r2 == ""
    assert_compare_equal(new, ref)


# ------------------------------------------------------------------------------------------
# precision: tiny KL against mpmath, and the series path near its threshold
# ------------------------------------------------------------------------------------------

def mp_row(s_row, t_row, target=None, dps=40):
    """KL(p_t || p_s), log p_s(t*) - log p_t(t*), log p_s/t(target) in 40-digit arithmetic."""
    mpmath.mp.dps = dps
    s = [mpmath.mpf(x) for x in s_row.double().tolist()]
    t = [mpmath.mpf(x) for x in t_row.tolist()]
    lzs = max(s) + mpmath.log(mpmath.fsum(mpmath.exp(x - max(s)) for x in s))
    lzt = max(t) + mpmath.log(mpmath.fsum(mpmath.exp(x - max(t)) for x in t))
    kl = mpmath.fsum(mpmath.exp(b - lzt) * ((b - lzt) - (a - lzs)) for a, b in zip(s, t))
    j = int(t_row.argmax())
    out = {"kl": float(kl), "lpdiff": float((s[j] - lzs) - (t[j] - lzt)),
           "lp_t_at_t": float(t[j] - lzt)}
    if target is not None:
        out["lp_s_target"] = float(s[target] - lzs)
        out["lp_t_target"] = float(t[target] - lzt)
    return out


def rel(a, b):
    return abs(a - b) / abs(b) if b != 0 else abs(a)


@pytest.mark.parametrize("case", ["f32", "f32_shift", "f32_noise", "f16", "bf16", "f64_ulp"])
def test_tiny_kl_against_mpmath(case):
    t = realistic(1, 6, 700, seed=13)
    s = {"f32": lambda: t.float(),
         "f32_shift": lambda: (t - 7.0).float(),
         "f32_noise": lambda: noisy(t, 1e-5, torch.float32),
         "f16": lambda: t.half(),
         "bf16": lambda: t.bfloat16(),
         "f64_ulp": lambda: t * (1 + 2 ** -50)}[case]()
    tg = torch.randint(0, 700, (1, 6), generator=torch.Generator().manual_seed(0))
    st = fm.position_stats(s, t, targets=tg)
    worst_old = 0.0
    for i in range(6):
        ref = mp_row(s[0, i], t[0, i], int(tg[0, i]))
        if case == "f32":
            assert 1e-15 < ref["kl"] < 1e-12          # the regime the brief is about
        assert rel(st.kl[i].item(), ref["kl"]) <= 1e-7, (i, st.kl[i].item(), ref["kl"])
        assert rel(st.lp_diff_at_t[i].item(), ref["lpdiff"]) <= 1e-7
        assert rel(st.lp_t_at_t[i].item(), ref["lp_t_at_t"]) <= 1e-12
        assert rel(st.lp_s_target[i].item(), ref["lp_s_target"]) <= 1e-12
        assert rel(st.lp_t_target[i].item(), ref["lp_t_target"]) <= 1e-12
        a, b = s[0, i].double(), t[0, i]
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        worst_old = max(worst_old, abs((lb.exp() * (lb - la)).sum().item() - ref["kl"]))
    # today's own absolute KL error is what bounds the agreement with it
    assert worst_old < KL_ATOL


def test_series_path_near_threshold_against_mpmath():
    """Rows with max|e| just under SERIES_MAX_E, with skewed and two-point-like distributions."""
    g = torch.Generator().manual_seed(7)
    v = 300
    t = realistic(1, 8, v, seed=3, std=2.0)[0]
    tau = fm.SERIES_MAX_E / 2 * 0.99                 # max|d| such that the bound is just met
    d = torch.zeros(8, v, dtype=F64)
    d[0] = tau * torch.rand(v, generator=g, dtype=F64)                     # all positive
    d[1] = tau * torch.sign(torch.randn(v, generator=g, dtype=F64))        # +-tau
    d[2, :5] = tau                                                          # few tokens
    d[3] = tau * torch.randn(v, generator=g, dtype=F64).clamp(-1, 1)
    d[4, t[4].argsort()[:-2]] = -tau                                        # all but the top 2
    d[5, t[5].argmax()] = tau                                               # only the argmax
    d[6] = -tau * torch.rand(v, generator=g, dtype=F64) ** 8
    d[7] = tau * (torch.arange(v) % 2 * 2 - 1)
    s = t + d
    st = fm.position_stats(s[None], t[None])
    assert bool((2 * st.max_abs <= fm.SERIES_MAX_E).all())
    for i in range(8):
        ref = mp_row(s[i], t[i])
        assert rel(st.kl[i].item(), ref["kl"]) <= 1e-7, (i, st.kl[i].item(), ref["kl"])


def test_exp_and_expm1_paths_against_mpmath():
    t = realistic(1, 6, 500, seed=17)[0]
    d = torch.zeros(6, 500, dtype=F64)
    d[0] = 0.3 * torch.randn(500, dtype=F64)            # exp path, KL ~ 1e-2
    d[1, t[1].argsort()[:3]] = 5.0                      # big |d| on unlikely tokens: tiny KL
    d[2, t[2].argsort()[:50]] = -40.0                   # exp path, tiny KL -> expm1
    d[3] = 0.05 * torch.randn(500, dtype=F64) + 100.0   # shifted by 100
    d[4, t[4].argmax()] = -30.0                         # subject loses the truth's favourite
    d[5, t[5].argsort()[0]] = 700.0                     # overflow risk -> exact fallback
    s = t + d
    st = fm.position_stats(s[None], t[None])
    for i in range(6):
        ref = mp_row(s[i], t[i])
        assert rel(st.kl[i].item(), ref["kl"]) <= 1e-7, (i, st.kl[i].item(), ref["kl"])
        assert rel(st.lp_diff_at_t[i].item(), ref["lpdiff"]) <= 1e-9


# ------------------------------------------------------------------------------------------
# per-position statistics against a direct float64 computation
# ------------------------------------------------------------------------------------------

def direct_stats(s, t, mask, targets, k=5):
    a = s.detach().double().reshape(-1, s.shape[-1])
    b = t.detach().double().reshape(-1, t.shape[-1])
    keep = mask.reshape(-1).bool() if mask is not None else torch.ones(a.shape[0], dtype=torch.bool)
    a, b = a[keep], b[keep]
    d = a - b
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    am, bm = a.argmax(-1), b.argmax(-1)
    ta, tb = a.topk(k, -1), b.topk(k, -1)
    out = dict(kl=(lb.exp() * (lb - la)).sum(-1).clamp_min(0), max_abs=d.abs().amax(-1),
               sq_err=(d * d).sum(-1), sq_truth=(b * b).sum(-1), argmax_s=am, argmax_t=bm,
               margin_t=tb.values[:, 0] - tb.values[:, 1],
               margin_s=ta.values[:, 0] - ta.values[:, 1],
               topk_s_has_t=(ta.indices == bm[:, None]).any(-1),
               topk_t_has_s=(tb.indices == am[:, None]).any(-1),
               lp_s_at_t=la.gather(1, bm[:, None])[:, 0], lp_t_at_t=lb.gather(1, bm[:, None])[:, 0])
    if targets is not None:
        tg = targets.reshape(-1)[keep]
        out["lp_s_target"] = la.gather(1, tg[:, None])[:, 0]
        out["lp_t_target"] = lb.gather(1, tg[:, None])[:, 0]
    return out


@pytest.mark.parametrize("name", ["f32", "bf16", "f32_noise3e-3", "garbage"])
def test_position_stats_fields(name):
    t = realistic(3, 25, 700, seed=31)
    s = SUBJECTS[name](t)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 25, generator=g) > 0.2
    targets = torch.randint(0, 700, (3, 25), generator=g)
    st = fm.position_stats(s, t, mask, targets, chunk=9)
    ref = direct_stats(s, t, mask, targets)
    for f, r in ref.items():
        x = getattr(st, f)
        assert x.shape == r.shape and x.device.type == "cpu", f
        if f == "kl":
            assert bool(((x - r).abs() <= torch.maximum(RTOL * r.abs(), torch.tensor(KL_ATOL))).all())
        elif r.dtype.is_floating_point and f not in ("max_abs", "margin_t", "margin_s"):
            torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-14, msg=f)
        else:
            assert torch.equal(x, r), f
    assert st.nonfinite == 0 and len(st) == int(mask.sum())


def test_invalid_targets_are_nan():
    t = realistic(1, 5, 50, seed=1)
    s = t.float()
    tg = torch.tensor([[0, -100, 49, 50, 3]])
    st = fm.position_stats(s, t, targets=tg)
    assert torch.isnan(st.lp_s_target[[1, 3]]).all() and torch.isfinite(st.lp_s_target[[0, 2, 4]]).all()
    c = fm.corpus_stats(st)
    assert c["n_targets"] == 3


def test_per_position_matches_today():
    t = realistic(3, 40, 700, seed=6)
    for s in (t.float(), t.bfloat16(), noisy(t, 1e-2, torch.float32)):
        new, ref = fm.per_position(s, t, chunk=11), old.per_position(s, t)
        assert new.keys() == ref.keys()
        for k in ref:
            for a, b in zip(new[k], ref[k]):     # 4 significant digits, printed: allow a last-digit flip
                assert abs(a - b) <= 1e-3 * abs(b) + (KL_ATOL if k == "kl_per_position" else 0), (k, a, b)


def test_empty_mask_raises():
    t = realistic(1, 4, 20)
    with pytest.raises(ValueError):
        fm.compare(t.float(), t, torch.zeros(1, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------
# corpus_stats against numpy
# ------------------------------------------------------------------------------------------

def numpy_corpus(s, t, targets, z=1.96):
    a = s.double().reshape(-1, s.shape[-1]).numpy()
    b = t.double().reshape(-1, t.shape[-1]).numpy()
    tg = targets.reshape(-1).numpy()

    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    la, lb = log_softmax(a), log_softmax(b)
    kl = np.maximum((np.exp(lb) * (lb - la)).sum(-1), 0.0)
    n = len(kl)
    rows = np.arange(n)
    ls, lt = la[rows, tg], lb[rows, tg]
    same = (a.argmax(-1) == b.argmax(-1)).astype(float)
    p = same.mean()
    dp = np.exp(ls) - np.exp(lt)
    se = lambda x: x.std(ddof=1) / np.sqrt(len(x))  # noqa: E731
    lr = np.mean(lt - ls)
    out = dict(n=n, kl_mean=kl.mean(), kl_mean_se=se(kl), kl_max=kl.max(), kl_min=kl.min(),
               kl_median=np.quantile(kl, 0.5), kl_p90=np.quantile(kl, 0.9),
               kl_p95=np.quantile(kl, 0.95), kl_p99=np.quantile(kl, 0.99),
               kl_p99_9=np.quantile(kl, 0.999), same_top1=p, same_top1_se=np.sqrt(p * (1 - p) / n),
               rms_dp=np.sqrt(np.mean(dp ** 2)),
               rms_dp_se=se(dp ** 2) / (2 * np.sqrt(np.mean(dp ** 2))),
               ppl_subject=np.exp(-ls.mean()), ppl_truth=np.exp(-lt.mean()),
               ppl_ratio=np.exp(lr), ppl_ratio_lo=np.exp(lr - z * se(lt - ls)),
               ppl_ratio_hi=np.exp(lr + z * se(lt - ls)), ln_ppl_ratio_se=se(lt - ls),
               ln_ppl_corr=np.corrcoef(ls, lt)[0, 1], dp_mean=dp.mean(), dp_max=dp.max(),
               dp_median=np.quantile(dp, 0.5),
               lp_at_t_absdiff_mean=np.abs(la[rows, b.argmax(-1)] - lb[rows, b.argmax(-1)]).mean(),
               lp_at_t_absdiff_max=np.abs(la[rows, b.argmax(-1)] - lb[rows, b.argmax(-1)]).max())
    # Wilson score interval
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    out.update(same_top1_lo=c - h, same_top1_hi=c + h)
    def topk(x, k=5):
        return np.argsort(-x, -1, kind="stable")[:, :k]
    ka, kb = topk(a), topk(b)
    s_has_t = (ka == b.argmax(-1)[:, None]).any(-1)
    t_has_s = (kb == a.argmax(-1)[:, None]).any(-1)
    out.update(topk_s_has_t=s_has_t.mean(), topk_t_has_s=t_has_s.mean(),
               topk_both=(s_has_t & t_has_s).mean())
    return out


@pytest.mark.parametrize("name", ["bf16_noise0.05", "f32_noise3e-3", "garbage"])
def test_corpus_stats_against_numpy(name):
    t = realistic(4, 60, 700, seed=41)
    s = SUBJECTS[name](t)
    targets = torch.randint(0, 700, (4, 60), generator=torch.Generator().manual_seed(9))
    got = fm.corpus_stats(fm.position_stats(s, t, targets=targets, chunk=17))
    ref = numpy_corpus(s, t, targets)
    for k, r in ref.items():
        assert abs(got[k] - r) <= 1e-6 * abs(r) + 1e-13, (k, got[k], r)
    assert got["kl_mean_lo"] == pytest.approx(got["kl_mean"] - 1.96 * got["kl_mean_se"])
    assert got["ppl_ratio"] == pytest.approx(got["ppl_subject"] / got["ppl_truth"], rel=1e-12)


def test_corpus_stats_without_targets():
    t = realistic(1, 30, 100)
    c = fm.corpus_stats(fm.position_stats(t.bfloat16(), t))
    assert c["n"] == 30 and math.isnan(c["ppl_ratio"]) and not math.isnan(c["kl_mean"])


# ------------------------------------------------------------------------------------------
# memory bound, and devices
# ------------------------------------------------------------------------------------------

_MEM_CHILD = r"""
import json, sys, torch
sys.path.insert(0, %r)
from harness.core import metrics as fm
t = torch.randn(2, 512, 32000, dtype=torch.float64)
s = t.float()
def kb(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1])
rss = kb('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
fm.position_stats(s, t, targets=torch.zeros(2, 512, dtype=torch.long))
print(json.dumps({'peak_mb': (kb('VmHWM') - rss) / 1024}))
"""


def test_peak_memory_is_bounded_by_a_chunk():
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD % ROOT], capture_output=True,
                         text=True, check=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    # inputs are 262 MB (f32) + 524 MB (f64); a float64 copy of the subject alone would be 262 MB
    assert peak < 64, peak


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    t = realistic(2, 50, 4000, seed=2)
    for s in (t.float(), t.bfloat16()):
        ref = fm.position_stats(s, t)
        got = fm.position_stats(s.cuda(), t.cuda())
        for f in fm._VECTOR_FIELDS:
            a, b = getattr(got, f), getattr(ref, f)
            assert a.device.type == "cpu"
            if a.dtype.is_floating_point:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
            else:
                assert torch.equal(a, b), f
        assert_compare_equal(fm.compare(s.cuda(), t.cuda())[0], old_compare(s, t)[0])


def test_every_kl_path_is_exercised(monkeypatch):
    """One chunk mixing series, exp, expm1 and fallback rows gives today's values row by row."""
    calls = {}
    for name in ("_kl_series", "_kl_exp", "_kl_expm1"):
        fn = getattr(fm, name)

        def wrapped(*a, _fn=fn, _name=name):
            calls[_name] = calls.get(_name, 0) + a[0].shape[0]
            return _fn(*a)
        monkeypatch.setattr(fm, name, wrapped)
    t = realistic(1, 8, 700, seed=23)[0]
    s = t.clone()
    s[0:2] = t[0:2].float().double()                     # series
    s[2:4] = t[2:4] + 0.2 * torch.randn(2, 700, dtype=F64)   # exp
    lo = t[4].argsort()[:20]
    s[4, lo] = t[4, lo] - 30.0                          # exp -> tiny KL -> expm1
    s[5] = t[5] * 400.0                                 # fallback (|d| > EXP_MAX_E)
    s[6] = t[6].bfloat16().double()                     # exp
    s[7] = t[7].float().double()                        # series
    st = fm.position_stats(s[None], t[None], chunk=8)
    assert calls == {"_kl_series": 2 + 1, "_kl_exp": 4, "_kl_expm1": 1}, calls
    ref = direct_stats(s[None], t[None], None, None)
    assert bool(((st.kl - ref["kl"]).abs() <= torch.maximum(RTOL * ref["kl"], torch.tensor(KL_ATOL))).all())
    torch.testing.assert_close(st.lp_s_at_t, ref["lp_s_at_t"], rtol=1e-12, atol=1e-14)


def test_all_zero_truth_gives_today_inf_nan():
    t = torch.zeros(1, 4, 50, dtype=F64)
    for s in (torch.zeros(1, 4, 50), torch.full((1, 4, 50), 0.5)):
        assert_compare_equal(fm.compare(s, t)[0], old_compare(s, t)[0])


def test_cache_gap_is_the_gap_kl_mean_in_units_of_the_reference_error():
    """cache_gap = mean KL(full || cached) / mean KL(truth || reference), each KL computed here
    straight from log_softmax; identical paths give 0, a non-finite side NaN."""
    g = torch.Generator().manual_seed(5)
    truth = torch.randn(2, 6, 40, generator=g, dtype=torch.float64)
    ref = truth + 1e-2 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    full = truth + 1e-2 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    cached = full + 3e-3 * torch.randn(truth.shape, generator=g, dtype=torch.float64)

    def kl_mean(p_logits, q_logits):
        lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())
    scale = fm.position_stats(ref, truth)
    got = fm.cache_gap(fm.position_stats(cached, full), scale)
    assert got == pytest.approx(kl_mean(full, cached) / kl_mean(truth, ref), rel=1e-6)
    assert fm.cache_gap(fm.position_stats(full, full), scale) == 0.0
    bad = full.clone()
    bad[0, 0, 0] = float("nan")
    assert math.isnan(fm.cache_gap(fm.position_stats(bad, full), scale))

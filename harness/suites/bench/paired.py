"""Paired, per-document comparison of two lm-eval runs, and the benchmark tolerance policy.

Two aggregate scores with their stderr hide what matters: the same documents were scored twice.
So for every task the two runs are joined on doc_id and compared sample by sample:
  multiple choice   |d loglikelihood| per (document, choice): max and p99; choice flips (acc and
                    acc_norm predictions that differ); McNemar's exact test on per-document acc
  rolling           |d loglikelihood| per document, per word: max and p99; relative change of word perplexity
  generation        share of documents whose raw generations differ; McNemar on exact_match
Every gated number has a limit in suites/bench_tolerance.toml, per dtype, with its reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.core import SUITES, deviations
from harness.core.datafiles import read_toml
from harness.core.errors import InputError
from harness.core.store import FAIL, INFO, NA, PASS, Row

DEFAULT_BENCH_POLICY = SUITES / "bench_tolerance.toml"
DRIFT_KEYS = ("bos", "num_fewshot", "batch_size", "padding_side", "max_length", "dtype", "softmax_dtype")
# What differs on purpose in an effects comparison is not drift.
GATED_METRICS = ("ll_diff_max", "ll_diff_p99", "choice_flip_rate", "gen_mismatch_rate", "score_diff",
                 "mcnemar_p")


@dataclass(frozen=True)
class BenchLimit:
    value: float
    kind: str          # "max": value must be <= limit; "min": value must be >= limit
    reason: str


@dataclass
class BenchPolicy:
    version: str
    path: Path
    limits: dict[tuple[str, str], BenchLimit]
    deviations: list[deviations.Deviation] = field(default_factory=list)

    def judge(self, dtype: str, metric: str, value: float | None) -> tuple[float | None, str, str]:
        lim = self.limits.get((dtype, metric))
        if lim is None:
            raise InputError(f"{self.path}: no limit for dtype {dtype!r}, metric {metric!r}")
        if value is None:
            return lim.value, NA, "no paired documents"
        if not math.isfinite(value):
            return lim.value, FAIL, "non-finite value"
        ok = value <= lim.value if lim.kind == "max" else value >= lim.value
        sign = ">" if lim.kind == "max" else "<"
        return lim.value, PASS if ok else FAIL, "" if ok else f"{value:.4g} {sign} {lim.value:.4g}"

    def require(self, dtypes) -> "BenchPolicy":
        for dtype in dtypes:
            missing = [m for m in GATED_METRICS if (dtype, m) not in self.limits]
            if missing:
                raise InputError(f"{self.path}: [{dtype}] lacks {', '.join(missing)}")
        return self


def load_bench_policy(path: str | Path | None = None) -> BenchPolicy:
    path = Path(path) if path else DEFAULT_BENCH_POLICY
    data = read_toml(path, "--policy")
    limits = {}
    for dtype, table in data.items():
        if dtype in ("version", "known"):
            continue
        if dtype not in ("float32", "bfloat16", "float16") or not isinstance(table, dict):
            raise InputError(f"{path}: [{dtype}]: not a dtype table (float32, bfloat16, float16)")
        for metric, spec in table.items():
            where = f"{path}: [{dtype}.{metric}]"
            if metric not in GATED_METRICS:
                raise InputError(f"{where}: unknown metric (known: {', '.join(GATED_METRICS)})")
            kinds = [k for k in ("max", "min") if k in (spec if isinstance(spec, dict) else {})]
            if not isinstance(spec, dict) or len(kinds) != 1 or set(spec) - {"max", "min", "reason"}:
                raise InputError(f"{where}: needs exactly one of max or min, and a reason")
            value = spec[kinds[0]]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{where}: {kinds[0]} = {value!r} must be a finite number >= 0")
            if not isinstance(spec.get("reason"), str) or not spec["reason"].strip():
                raise InputError(f"{where}: needs a reason")
            limits[(dtype, metric)] = BenchLimit(float(value), kinds[0], spec["reason"])
    policy = BenchPolicy(data["version"], path, limits, deviations.read(data, str(path)))
    return policy.require({d for d, _ in limits})


# --- statistics ------------------------------------------------------------------------------------

def mcnemar_exact(a_right: list[bool], b_right: list[bool]) -> tuple[float, int, int]:
    """Two-sided exact McNemar p-value (binomial on the discordant pairs), and the two counts."""
    b = sum(x and not y for x, y in zip(a_right, b_right))
    c = sum(y and not x for x, y in zip(a_right, b_right))
    n = b + c
    if n == 0:
        return 1.0, b, c
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail), b, c


def binomial_above_chance(successes: int, n: int, chance: float) -> float:
    """One-sided exact p-value of >= successes out of n at the chance rate: the binomial survival
    function (summing C(n, i) p^i (1-p)^(n-i) term by term overflows a float past ~1000 documents)."""
    from scipy.stats import binom
    return float(binom.sf(successes - 1, n, chance))


def _p99(x: np.ndarray) -> float:
    return float(np.percentile(x, 99)) if x.size else float("nan")


def _ll(resp) -> float:
    """A filtered response's loglikelihood: (ll, greedy) for choices, ll for rolling."""
    while isinstance(resp, (list, tuple)):
        resp = resp[0]
    return float(resp)


# --- per-task paired metrics -----------------------------------------------------------------------

def paired_task(output_type: str, a: list[dict], b: list[dict]) -> dict:
    """Paired metrics for one task; a and b are lm-eval samples (log_samples=True)."""
    da, db = {s["doc_id"]: s for s in a}, {s["doc_id"]: s for s in b}
    ids = sorted(set(da) & set(db))
    out: dict = {"docs": len(ids), "unpaired": len(set(da) ^ set(db))}
    if not ids:
        return out
    if output_type == "multiple_choice":
        diffs, flips, flips_norm, ra, rb = [], 0, 0, [], []
        for i in ids:
            la = np.array([_ll(r) for r in da[i]["filtered_resps"]])
            lb = np.array([_ll(r) for r in db[i]["filtered_resps"]])
            if la.shape != lb.shape:
                raise InputError(f"doc {i}: the two runs scored different numbers of choices")
            diffs.extend(np.abs(la - lb).tolist())
            lens = np.array([max(1, len(arg[1])) for arg in da[i]["arguments"]], dtype=float)
            flips += int(np.argmax(la) != np.argmax(lb))
            flips_norm += int(np.argmax(la / lens) != np.argmax(lb / lens))
            ra.append(bool(da[i]["acc"]))
            rb.append(bool(db[i]["acc"]))
        p, nb, nc = mcnemar_exact(ra, rb)
        d = np.array(diffs)
        out.update(ll_diff_max=float(d.max()), ll_diff_p99=_p99(d), choice_flip_rate=flips / len(ids),
                   choice_flips=flips, choice_flips_norm=flips_norm, mcnemar_p=p, mcnemar_b=nb, mcnemar_c=nc,
                   score_a=float(np.mean(ra)), score_b=float(np.mean(rb)),
                   score_diff=abs(float(np.mean(ra)) - float(np.mean(rb))), score_name="acc")
    elif output_type == "loglikelihood_rolling":
        la = np.array([_ll(da[i]["filtered_resps"]) for i in ids])
        lb = np.array([_ll(db[i]["filtered_resps"]) for i in ids])
        words = np.array([da[i]["word_perplexity"][1] for i in ids], dtype=float)
        # A document's loglikelihood is a sum over all its tokens, so its rounding grows with its
        # length: per word, a long document is held to the same limit as a short one.
        d = np.abs(la - lb) / np.maximum(words, 1)
        ppl_a, ppl_b = math.exp(-la.sum() / words.sum()), math.exp(-lb.sum() / words.sum())
        out.update(ll_diff_max=float(d.max()), ll_diff_p99=_p99(d), score_a=ppl_a, score_b=ppl_b,
                   score_diff=abs(ppl_a / ppl_b - 1), score_name="word_perplexity (relative diff)")
    elif output_type == "generate_until":
        raw_a = [da[i]["resps"][0][0] for i in ids]
        raw_b = [db[i]["resps"][0][0] for i in ids]
        mism = sum(x != y for x, y in zip(raw_a, raw_b))
        ra = [bool(da[i]["exact_match"]) for i in ids]
        rb = [bool(db[i]["exact_match"]) for i in ids]
        p, nb, nc = mcnemar_exact(ra, rb)
        out.update(gen_mismatch_rate=mism / len(ids), gen_identical=len(ids) - mism, mcnemar_p=p,
                   mcnemar_b=nb, mcnemar_c=nc, score_a=float(np.mean(ra)), score_b=float(np.mean(rb)),
                   score_diff=abs(float(np.mean(ra)) - float(np.mean(rb))), score_name="exact_match",
                   first_mismatch=next(({"doc_id": i, "a": x, "b": y} for i, x, y in zip(ids, raw_a, raw_b)
                                        if x != y), None))
    else:
        raise InputError(f"task output_type {output_type!r} is not compared (multiple_choice, "
                         "loglikelihood_rolling, generate_until)")
    return out


def compare_runs(subject: str, against: str, a: dict, b: dict, policy: BenchPolicy, dtype: str,
                 gated: bool) -> list[Row]:
    """Rows for every task both runs have: gated against the policy, or info for effect studies."""
    rows = []
    for task in sorted(set(a["samples"]) & set(b["samples"])):
        otype = a["configs"][task]["output_type"]
        m = paired_task(otype, a["samples"][task], b["samples"][task])
        case = {"task": task, "dtype": dtype, "batch_size": a["settings"]["batch_size"],
                "against_batch_size": b["settings"]["batch_size"], "against_dtype": b["settings"]["dtype"]}
        # The evidence a known deviation is matched on: the task's request type, the subjects
        # (without @variant) and whether the hf side's tokenizer adds BOS.
        settings = a["settings"] if subject.split("@")[0] == "hf" else b["settings"]
        extra = {**{k: v for k, v in m.items() if k not in GATED_METRICS}, "output_type": otype,
                 "subjects": f"{subject.split('@')[0]},{against.split('@')[0]}", "bos": settings.get("bos")}
        for metric in GATED_METRICS:
            if metric not in m:
                continue
            value = m[metric]
            if gated:
                tol, status, reason = policy.judge(dtype, metric, value)
            else:
                tol, status, reason = None, INFO, "effect measured, not gated"
            rows.append(Row("bench", case, subject, against, metric, value, tol, status, reason, extra))
    return deviations.settle(rows, policy.deviations)


def drift_rows(subject: str, against: str, a: dict, b: dict) -> list[Row]:
    sa, sb = a["settings"], b["settings"]
    differ = [k for k in DRIFT_KEYS if sa.get(k) != sb.get(k)]
    reason = "; ".join(f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in differ)
    return [Row("bench", {"task": "*", "dtype": sa.get("dtype")}, subject, against, "config_drift",
                float(len(differ)), 0.0, FAIL if differ else PASS, reason,
                {"subject_settings": sa, "against_settings": sb})]


def scores_rows(evals: dict, run) -> list[Row]:
    """Each subject's aggregate scores (info), and for multiple choice the p-value against chance."""
    rows = []
    for name, ev in evals.items():
        for task, metrics in ev["results"].items():
            case = {"task": task, "dtype": ev["settings"]["dtype"], "batch_size": ev["settings"]["batch_size"]}
            for key, value in metrics.items():
                if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric = key.split(",")[0]
                stderr = metrics.get(key.replace(",", "_stderr,"))
                extra = {"stderr": stderr} if isinstance(stderr, (int, float)) else {}
                rows.append(Row("bench", case, name, "score", metric, float(value), None, INFO, "", extra))
            if task in run.chance and task in ev["samples"]:
                hits = [bool(s["acc"]) for s in ev["samples"][task]]
                p = binomial_above_chance(sum(hits), len(hits), run.chance[task])
                rows.append(Row("bench", case, name, f"chance={run.chance[task]}", "acc_above_chance_p", p, None,
                                INFO, "", {"correct": sum(hits), "docs": len(hits)}))
    return rows

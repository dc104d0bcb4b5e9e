"""A subject's fidelity on real text against the float64 oracle, whatever its kind.

What the fidelity table of ``benchmarks/subjects_fidelity.py`` and the subject tests share:

- ``open_source``: the ``Source`` of a model folder (or the embedded default);
- ``build``: a subject from its ``--subject`` spelling, through the registry;
- ``measure``: its logits on corpus windows against the oracle's, as llama.cpp's
  ``perplexity --kl-divergence`` statistics (``harness.core.metrics.corpus_stats``), and for a
  subject that can hand back the weights it really runs (``dequantised()``) the **error split**:
  the oracle run on those weights, so that KL(oracle || subject) is told apart into the weights'
  quantisation, KL(oracle || oracle on dequantised weights), and the runtime's own arithmetic,
  KL(oracle on dequantised weights || subject);
- the two ways a subject is judged: an exact one like transformers, by the logits rule against
  the reference's own float32 error (suites/tolerance.toml); a lossy one against the per-type
  budgets of suites/subjects_tolerance.toml (one [[budget]] schema for every kind: ``budget``,
  ``over_budget`` for tests that hold plain corpus statistics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.core import SUITES
from harness.core.datafiles import read_toml
from harness.core.errors import InputError
from harness.core.metrics import (CORPUS_GATED, PositionStats, beyond_rounding, corpus_stats, position_stats,
                                  summarize)
from harness.core.tolerance import Limit, load_policy
from harness.subjects import Source, Subject, factory, load_kinds, parse_spec  # noqa: F401 (load_kinds: re-exported)

BUDGETS = SUITES / "subjects_tolerance.toml"
# What a lossy budget may hold: each "lower is better", judged as value <= budget.
BUDGET_METRICS = {
    "kl_mean": "mean KL(oracle || subject) over positions (nats)",
    "kl_p99": "99th percentile of the per-position KL",
    "kl_max": "largest per-position KL",
    "top1_differ": "1 - same top-1 rate",
    "rms_dp": "RMS of p_subject(next token) - p_oracle(next token)",
    "ppl_ratio_dev": "|PPL(subject) / PPL(oracle) - 1|",
    "weights_kl_mean": "split: mean KL(oracle || oracle on the subject's dequantised weights)",
    "runtime_kl_mean": "split: mean KL(oracle on the subject's dequantised weights || subject)",
}
# The logits rule's metrics for an exact subject (harness/suites/logits.py gates the same).
EXACT_METRICS = ("max_abs", "rel_l2", "nmse", "kl_mean", "kl_p99", "kl_max", "logprob_diff_max",
                 "top1_flips", "topk_misses", *CORPUS_GATED)


def open_source(model: str | Path | None = None, preset: str | None = None) -> Source:
    """The weights of --model (or a preset, or the embedded default) as a subject ``Source``."""
    from harness.core.checkpoints import open_model
    from harness.subjects.common import source_of
    if preset is not None:
        from harness.core.presets import cached
        model = cached(preset)
    return source_of(open_model(model))


def build(spec: str, source: Source, dtype: str = "float32", device: str = "cpu") -> Subject:
    s = parse_spec(spec)
    return factory(s)(source, dtype, device, s.options)


def corpus_windows(source: Source, name: str = "heldout", ctx: int = 128, max_tokens: int | None = 1024):
    """The named corpus in windows of ``ctx`` tokens, BOS first (harness.core.corpus)."""
    import sentencepiece as spm

    from harness.core import corpus
    if source.tokenizer is None:
        raise InputError("no tokenizer.model at hand to cut the corpus into tokens")
    sp = spm.SentencePieceProcessor(model_file=str(source.tokenizer))
    label, text = corpus.text_of(name, None)
    return corpus.windows(label, text, sp, ctx, max_tokens)


@torch.inference_mode()
def oracle_logits(ckpt, ids: torch.Tensor, batch: int = 2, dtype: str = "float64") -> torch.Tensor:
    """The reference's logits on every window (float64 and float64 RoPE angles: the oracle)."""
    from harness.core.subjects import ReferenceSubject
    ref = ReferenceSubject(ckpt, dtype, "cpu", oracle=dtype == "float64")
    out = torch.cat([ref.logits(ids[i:i + batch]).to(torch.float64 if dtype == "float64" else torch.float32)
                     for i in range(0, ids.shape[0], batch)])
    del ref
    return out


@dataclass
class Fidelity:
    """One subject's corpus statistics against the oracle, and its split where it has one."""
    label: str
    settings: dict
    provenance: dict
    stats: PositionStats | None = None
    corpus: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)        # weights_kl_mean, runtime_kl_mean, ...
    na: str = ""                                     # why the subject could not run here
    seconds: float = 0.0

    def value(self, metric: str) -> float:
        c = self.corpus
        if metric == "top1_differ":
            return 1.0 - c["same_top1"]
        if metric == "ppl_ratio_dev":
            return abs(c["ppl_ratio"] - 1.0)
        if metric in self.split:
            return self.split[metric]
        return c[metric]


def measure(subject: Subject, label: str, windows, truth: torch.Tensor, split: bool | None = None,
            batch: int = 2) -> Fidelity:
    """``subject`` on ``windows`` against ``truth`` (the oracle's float64 logits of the same windows)."""
    import time
    cannot = subject.cannot()
    f = Fidelity(label, subject.settings(), subject.provenance())
    if "subject" in cannot:
        f.na = cannot["subject"]
        return f
    t0 = time.perf_counter()
    logits = torch.cat([subject.forward(windows.ids[i:i + batch]) for i in range(0, windows.ids.shape[0], batch)])
    f.seconds = time.perf_counter() - t0
    f.provenance = subject.provenance()          # now with what the run itself decided (context size)
    f.stats = position_stats(logits, truth, targets=windows.targets)
    f.corpus = corpus_stats(f.stats)
    lossy = not getattr(subject, "exact", False)
    if (split if split is not None else lossy) and hasattr(subject, "dequantised"):
        f.split = error_split(subject, logits, windows, truth, batch)
    return f


def error_split(subject, logits: torch.Tensor, windows, truth: torch.Tensor, batch: int = 2) -> dict:
    """KL(oracle || subject) told apart: the file's weights (the oracle on them) and the runtime."""
    ckpt = subject.dequantised()
    source = getattr(subject, "source", None)
    same = source is not None and ckpt.args == source.ckpt.args and set(ckpt.state) == set(source.ckpt.state) and all(
        torch.equal(ckpt.state[k], v.to(torch.float32)) for k, v in source.ckpt.state.items())
    if same:        # the file holds the checkpoint's own numbers: the weights part is exactly 0
        runtime = corpus_stats(position_stats(logits, truth, targets=windows.targets))
        return {"weights_kl_mean": 0.0, "weights_note": "bit-equal to the checkpoint",
                "runtime_kl_mean": runtime["kl_mean"], "runtime_kl_p99": runtime["kl_p99"]}
    deq = oracle_logits(ckpt, windows.ids, batch)
    del ckpt
    return split_of(position_stats(deq, truth, targets=windows.targets),
                    position_stats(logits, deq, targets=windows.targets))


def split_of(weights: PositionStats, runtime: PositionStats) -> dict:
    """The split's figures from two comparisons over the same positions: the oracle on the subject's
    dequantised weights against the oracle (the weights' share), the subject against that (the runtime's)."""
    w, r = corpus_stats(weights), corpus_stats(runtime)
    return {"weights_kl_mean": w["kl_mean"], "weights_kl_p99": w["kl_p99"], "weights_same_top1": w["same_top1"],
            "runtime_kl_mean": r["kl_mean"], "runtime_kl_p99": r["kl_p99"], "runtime_same_top1": r["same_top1"]}


# --- judging -------------------------------------------------------------------------------------

def exact_values(stats: PositionStats, reference: PositionStats, max_factor: float) -> tuple[dict, dict]:
    """(subject's, reference's) values of the logits rule's metrics on one corpus."""
    values, why = summarize(stats)
    if why:
        raise ValueError(why)
    ref_values, _ = summarize(reference)
    values.update(beyond_rounding(stats, reference, max_factor))
    ref_values.update(beyond_rounding(reference, reference, max_factor))
    c, rc = corpus_stats(stats), corpus_stats(reference)
    values.update({m: c[m] for m in CORPUS_GATED})
    ref_values.update({m: rc[m] for m in CORPUS_GATED})
    return values, ref_values


def judge_exact(stats: PositionStats, reference: PositionStats, policy_path: Path | None = None) -> list[tuple]:
    """[(metric, value, tolerance, status, reason)] by suites/tolerance.toml at float32, against the
    reference's own float32 error on the same windows: how transformers is judged."""
    from harness.core.metrics import POLICY_METRICS
    policy = load_policy(policy_path, metrics=POLICY_METRICS)
    lim = policy.limit("float32", "max_abs")
    values, ref_values = exact_values(stats, reference, lim.max_factor or lim.factor)
    out = []
    for m in EXACT_METRICS:
        tol, status, reason = policy.judge("float32", m, values[m], ref_values[m])
        out.append((m, values[m], tol, status, reason))
    return out


@dataclass
class Budget:
    kind: str
    match: dict
    limits: dict[str, Limit]
    measured: str


def load_budgets(path: Path | None = None) -> tuple[str, list[Budget]]:
    """suites/subjects_tolerance.toml: [[budget]] entries (kind, match, metric = number, reason)."""
    path = Path(path) if path else BUDGETS
    data = read_toml(path, "subjects policy")
    entries = data.get("budget")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: no [[budget]] entries")
    budgets = []
    for n, e in enumerate(entries, 1):
        where = f"{path}: [[budget]] #{n}"
        if not isinstance(e, dict) or not isinstance(e.get("kind"), str) or not isinstance(e.get("match"), dict):
            raise InputError(f"{where}: needs kind = \"...\" and match = {{...}}")
        if not isinstance(e.get("reason"), str) or not e["reason"].strip():
            raise InputError(f"{where}: needs a reason (a string saying where the numbers come from)")
        limits = {}
        for key, value in e.items():
            if key in ("kind", "match", "reason", "measured"):
                continue
            if key not in BUDGET_METRICS:
                raise InputError(f"{where}: unknown metric {key!r} (known: {', '.join(BUDGET_METRICS)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{where}: {key} = {value!r} must be a finite number >= 0")
            limits[key] = Limit(abs=float(value), factor=1.0, floor=0.0, reason=e["reason"])
        budgets.append(Budget(e["kind"], {k: str(v) for k, v in e["match"].items()}, limits, str(e.get("measured", ""))))
    return data["version"], budgets


def budget_for(kind: str, settings: dict, budgets: list[Budget]) -> Budget | None:
    """The most specific budget whose match the subject's settings satisfy."""
    fits = [b for b in budgets if b.kind == kind and all(str(settings.get(k)) == v for k, v in b.match.items())]
    return max(fits, key=lambda b: len(b.match), default=None)


def budget(kind: str, settings: dict, path: Path | None = None) -> dict[str, float]:
    """metric -> largest value allowed, of the most specific [[budget]] matching a subject's
    settings; none is bad input naming the file, the kind and the settings."""
    _, budgets = load_budgets(path)
    b = budget_for(kind, settings, budgets)
    if b is None:
        raise InputError(f"{path or BUDGETS}: no [[budget]] for {kind} matching {settings_key(settings)}")
    return {m: lim.abs for m, lim in b.limits.items()}


def over_budget(values: dict[str, float], limits: dict[str, float]) -> dict[str, str]:
    """metric -> 'value > limit' for every budget metric that corpus statistics (corpus_stats, plus
    the split's weights_/runtime_ values where measured) break."""
    values = dict(values)
    if "same_top1" in values:
        values["top1_differ"] = 1.0 - values["same_top1"]
    if "ppl_ratio" in values:
        values["ppl_ratio_dev"] = abs(values["ppl_ratio"] - 1.0)
    return {m: f"{values[m]:.3g} > {lim:.3g}" for m, lim in limits.items() if m in values and not values[m] <= lim}


def judge_lossy(f: Fidelity, budget: Budget) -> list[tuple]:
    """[(metric, value, budget, status, reason)]: each value must stay within its budget (the split's
    parts only where the split was measured)."""
    out = []
    for m, lim in budget.limits.items():
        if m.startswith(("weights_", "runtime_")) and m not in f.split:
            continue                               # the split was not run for this measurement
        value = f.value(m)
        ok = value is not None and math.isfinite(value) and value <= lim.abs
        out.append((m, value, lim.abs, "pass" if ok else "fail",
                    "" if ok else f"{value:.3g} > budget {lim.abs:.3g}"))
    return out


def settings_key(settings: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(settings.items()))

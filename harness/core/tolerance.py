"""The tolerance policy: a versioned TOML file in suites/, judged the same way for every cell.

For each dtype and metric the policy gives
  abs    a hard ceiling for every subject (the reference too),
  factor how many times worse than the reference at the same dtype a subject may be
         (max_factor for the extremes: maxima and high quantiles, see EXTREMES),
  floor  the limit used instead when factor x the reference's error is smaller than it.
So a subject passes when value <= min(abs, max(floor, factor * reference_value)). The relative
part calibrates the policy on every run: the reference's own float64-vs-dtype error says what a
correct implementation at that dtype reaches on this model and input. NaN/Inf never pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from harness.core import SUITES
from harness.core.datafiles import read_toml
from harness.core.errors import InputError
from harness.core.store import FAIL, PASS

DEFAULT_POLICY = SUITES / "tolerance.toml"
POLICY_DTYPES = ("float32", "bfloat16", "float16")


# Statistics over positions come in two kinds. A mean (kl_mean, rel_l2, nmse) varies little from
# one input to the next, so the reference's value predicts a correct subject's closely. An
# extreme (a max or a high quantile) is one draw: two correct implementations' maxima differ by
# 3x on 128 positions (measured), so they get their own factor, calibrated on the distribution of
# that ratio over many clean runs (benchmarks/calibrate_policy.py), not on one.
EXTREMES = ("max_abs", "kl_max", "kl_p99", "logprob_diff_max")
# Ratios to the reference measured position by position (harness.core.metrics.PAIRED): already
# relative, so judged against abs alone.
RATIOS = ("kl_ratio_lo",)


@dataclass(frozen=True)
class Limit:
    abs: float
    factor: float
    floor: float
    reason: str
    max_factor: float | None = None    # for EXTREMES; None: factor
    noise_factor: float | None = None  # train's loss: times the reference's own noise scale (None: no such term)

    def allowed(self, metric: str, reference_value: float | None) -> float:
        """min(abs, max(floor, f x reference)); the reference itself is held to abs."""
        if reference_value is None or not math.isfinite(reference_value) or metric in RATIOS:
            return self.abs
        f = self.max_factor if metric in EXTREMES and self.max_factor is not None else self.factor
        return min(self.abs, max(self.floor, f * reference_value))


@dataclass
class Policy:
    version: str
    path: Path
    limits: dict[tuple[str, str], Limit]   # (dtype, metric) -> Limit

    def limit(self, dtype: str, metric: str) -> Limit:
        try:
            return self.limits[(dtype, metric)]
        except KeyError:
            raise InputError(f"{self.path}: no tolerance for dtype {dtype!r}, metric {metric!r}") from None

    def require(self, dtypes, metrics) -> "Policy":
        """Every (dtype, metric) a run will judge must have a limit: checked before the run starts."""
        missing = [f"[{d}.{m}]" for d in dtypes for m in metrics if (d, m) not in self.limits]
        if missing:
            raise InputError(f"{self.path}: no tolerance for {', '.join(missing[:6])}"
                             + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
        return self

    def judge(self, dtype: str, metric: str, value: float, reference_value: float | None) -> tuple[float, str, str]:
        """(tolerance, status, reason) for one value; reference_value None judges the reference itself."""
        tol = self.limit(dtype, metric).allowed(metric, reference_value)
        if value is None or not math.isfinite(value):
            return tol, FAIL, "non-finite value"
        if value <= tol:
            return tol, PASS, ""
        return tol, FAIL, f"{value:.3g} > {tol:.3g}"


def _number(spec: dict, key: str, where: str, low: float) -> float:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
        raise InputError(f"{where}: {key} = {v!r} must be a finite number >= {low:g}")
    return float(v)


def load_policy(path: str | Path | None = None, arg: str = "--policy", metrics=None) -> Policy:
    """A tolerance policy, every number checked when it is read. ``metrics``: the metric names the
    policy may hold (a misspelled table is an error, not a silently unused one)."""
    path = Path(path) if path else DEFAULT_POLICY
    data = read_toml(path, arg)
    limits = {}
    for dtype, table in data.items():
        if dtype in ("version", "metadata"):
            continue
        if dtype not in POLICY_DTYPES or not isinstance(table, dict):
            raise InputError(f"{path}: [{dtype}]: not a dtype table (known: {', '.join(POLICY_DTYPES)})")
        factor, max_factor = table.get("factor"), table.get("max_factor")
        for metric, spec in table.items():
            if metric in ("factor", "max_factor"):
                continue
            where = f"{path}: [{dtype}.{metric}]"
            if not isinstance(spec, dict):
                raise InputError(f"{where}: must be a table with abs, floor and a reason")
            if metrics is not None and metric not in metrics:
                raise InputError(f"{where}: unknown metric (known: {', '.join(metrics)})")
            unknown = sorted(set(spec) - {"abs", "floor", "factor", "max_factor", "noise_factor", "reason"})
            if unknown:
                raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}")
            if not isinstance(spec.get("reason"), str) or not spec["reason"].strip():
                raise InputError(f"{where}: needs a reason (a string saying why this number)")
            f = spec.get("factor", factor)
            mf = spec.get("max_factor", max_factor)
            lim = Limit(abs=_number(spec, "abs", where, 0.0),
                        factor=_number({"factor": f}, "factor", f"{where} (or [{dtype}] factor)", 1.0),
                        floor=_number(spec, "floor", where, 0.0), reason=spec["reason"],
                        max_factor=None if mf is None else _number({"max_factor": mf}, "max_factor",
                                                                    f"{where} (or [{dtype}] max_factor)", 1.0),
                        noise_factor=None if "noise_factor" not in spec else _number(spec, "noise_factor", where, 0.0))
            if lim.floor > lim.abs:
                raise InputError(f"{where}: floor {lim.floor:g} is above abs {lim.abs:g}")
            limits[(dtype, metric)] = lim
    return Policy(data["version"], path, limits)

"""The regression gate: compare a current results set with a baseline, cell by cell.

The tolerance policy asks "is this cell close enough to the truth?"; this module asks "did it get
worse than it was?". Cells are matched on (suite, case settings, subject, against, metric); only
gated rows (pass/fail) are compared, info rows are measured but never gate. A cell fails when

  - a finite baseline value became non-finite, or
  - current > max(factor * baseline, baseline + slack)   (suites/regression.toml), or
  - it passed its tolerance in the baseline and fails it now, or
  - it is gone from the current run (a narrowed matrix could hide a regression; --allow-missing
    turns that into info).

Results are written in the common schema (harness/store.py) as suite "compare": value = current,
tolerance = the allowed value, extra = the baseline's value and status.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import SUITES
from harness.core.datafiles import read_toml
from harness.core.errors import InputError
from harness.core.store import FAIL, INFO, PASS, Row
from harness.core.suite import Context, Part, Result, Suite
from harness.results.stored import find_results, load_summary, policy_version

DEFAULT_REGRESSION_POLICY = SUITES / "regression.toml"
SUITE = "compare"


@dataclass(frozen=True)
class Allowance:
    factor: float
    slack: float
    reason: str

    def allowed(self, baseline: float) -> float:
        return max(self.factor * baseline, baseline + self.slack)


@dataclass
class RegressionPolicy:
    version: str
    path: Path
    default: Allowance
    metrics: dict[str, Allowance]

    def for_metric(self, metric: str) -> Allowance:
        return self.metrics.get(metric, self.default)


def _allowance(spec: Any, where: str, fallback: Allowance | None) -> Allowance:
    if not isinstance(spec, dict):
        raise InputError(f"{where}: must be a table")
    unknown = sorted(set(spec) - {"factor", "slack", "reason"})
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (factor, slack, reason)")
    values = {}
    for key, low in (("factor", 1.0), ("slack", 0.0)):
        v = spec.get(key, getattr(fallback, key) if fallback else None)
        # NaN compares false with everything: a NaN factor would pass any regression.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
            raise InputError(f"{where}: {key} = {v!r} must be a finite number >= {low:g} "
                             "(a gate may not demand improvement)")
        values[key] = float(v)
    if not isinstance(spec.get("reason"), str) or not spec["reason"].strip():
        raise InputError(f"{where}: needs a reason")
    return Allowance(values["factor"], values["slack"], spec["reason"])


def load_regression_policy(path: str | Path | None = None) -> RegressionPolicy:
    path = Path(path) if path else DEFAULT_REGRESSION_POLICY
    data = read_toml(path, "--regression-policy")
    if "default" not in data:
        raise InputError(f"{path}: missing table [default]")
    default = _allowance(data["default"], f"{path}: [default]", None)
    unknown = sorted(set(data) - {"version", "default", "metric"})
    if unknown:
        raise InputError(f"{path}: unknown table(s) {', '.join(unknown)} (default, metric)")
    if not isinstance(data.get("metric", {}), dict):
        raise InputError(f"{path}: [metric] must be a table of [metric.NAME] tables")
    metrics = {m: _allowance(spec, f"{path}: [metric.{m}]", default)
               for m, spec in (data.get("metric") or {}).items()}
    return RegressionPolicy(data["version"], path, default, metrics)


def _key(cell: dict) -> tuple:
    return (cell["suite"], tuple(sorted((str(k), str(v)) for k, v in cell["case"].items())),
            cell["subject"], cell["against"], cell["metric"])


def _value(x) -> float | None:
    return None if x is None else float(x)   # "nan"/"inf" spelled out in JSON read back as floats


def _gated(summary: dict) -> dict[tuple, dict]:
    return {_key(c): c for c in summary["cells"] if c["status"] in (PASS, FAIL)}


def compare(baseline: list[dict], current: list[dict], policy: RegressionPolicy,
            allow_missing: bool = False) -> list[Row]:
    """One row per gated cell of the baseline or the current run, judged by the regression policy."""
    base: dict[tuple, dict] = {}
    cur: dict[tuple, dict] = {}
    for s in baseline:
        base.update(_gated(s))
    for s in current:
        cur.update(_gated(s))
    rows: list[Row] = []
    for key, b in base.items():
        c = cur.get(key)
        case = {"suite": b["suite"], **b["case"], "measured_against": b["against"]}
        extra = {"baseline": _value(b["value"]), "baseline_status": b["status"]}
        if c is None:
            rows.append(Row(SUITE, case, b["subject"], "baseline", b["metric"], None,
                            status=INFO if allow_missing else FAIL,
                            reason="cell missing from the current run", extra=extra))
            continue
        rows.append(_judge(case, b, c, policy.for_metric(b["metric"]), extra))
    for key, c in cur.items():
        if key not in base:
            rows.append(Row(SUITE, {"suite": c["suite"], **c["case"], "measured_against": c["against"]},
                            c["subject"], "baseline", c["metric"],
                            _value(c["value"]), status=INFO, reason="new cell: no baseline to compare with"))
    return rows


def _judge(case: dict, b: dict, c: dict, allow: Allowance, extra: dict) -> Row:
    bv, cv = _value(b["value"]), _value(c["value"])
    row = Row(SUITE, case, c["subject"], "baseline", c["metric"], cv, extra={**extra, "current_status": c["status"]})
    if bv is None or not math.isfinite(bv):
        row.status, row.reason = INFO, "baseline value not finite: nothing to regress from"
        return row
    row.tolerance = allow.allowed(bv)
    if cv is None or not math.isfinite(cv):
        row.status, row.reason = FAIL, f"became non-finite (baseline {bv:.3g})"
    elif b["status"] == PASS and c["status"] == FAIL:
        row.status, row.reason = FAIL, f"newly fails its tolerance: {c.get('reason') or ''} (baseline {bv:.3g})"
    elif cv > row.tolerance:
        ratio = cv / bv if bv > 0 else math.inf
        row.status, row.reason = FAIL, (f"regressed {ratio:.3g}x: {cv:.3g} > allowed {row.tolerance:.3g} "
                                        f"(baseline {bv:.3g})")
    else:
        row.status = PASS
        if bv > 0 and cv < bv / allow.factor:
            row.reason = f"improved {bv / cv if cv > 0 else math.inf:.3g}x (baseline {bv:.3g})"
    return row


def moved(rows: list[Row]) -> list[Row]:
    """Cells worth a line in the console: failures, improvements, missing and new cells."""
    return [r for r in rows if r.status == FAIL or r.reason]


def summary_extra(baseline: list[dict], current: list[dict], policy: RegressionPolicy,
                  baseline_dirs: list[Path], current_dirs: list[Path]) -> dict:
    return {
        "baseline": {"results": [str(p) for p in baseline_dirs],
                     "tolerance_policy": sorted({policy_version(s) for s in baseline}),
                     "harness_commit": sorted({str(s["environment"].get("harness_commit")) for s in baseline})},
        "current": {"results": [str(p) for p in current_dirs],
                    "tolerance_policy": sorted({policy_version(s) for s in current}),
                    "harness_commit": sorted({str(s["environment"].get("harness_commit")) for s in current})},
        "policy": {"path": str(policy.path), "version": policy.version},
        "rule": "current > max(factor * baseline, baseline + slack) fails, even under the absolute tolerance",
    }


class Compare(Suite):
    name = "compare"
    help = "regression gate: which cells moved from a baseline, and did any get worse"

    def add_arguments(self, p) -> None:
        p.add_argument("--baseline", required=True, help="baseline results folder")
        p.add_argument("--current", required=True, help="current results folder")
        p.add_argument("--regression-policy", help="regression policy TOML (default: suites/regression.toml)")
        p.add_argument("--allow-missing", action="store_true",
                       help="a baseline cell absent from the current run is info, not a failure")

    def run(self, a, ctx: Context) -> Result:
        policy = load_regression_policy(a.regression_policy)
        base_dirs, cur_dirs = find_results([Path(a.baseline)]), find_results([Path(a.current)])
        base = [load_summary(d) for d in base_dirs]
        cur = [load_summary(d) for d in cur_dirs]
        rows = compare(base, cur, policy, allow_missing=a.allow_missing)
        notes = [f"{r.status.upper():4} {r.cell_id()}: {r.reason}" for r in moved(rows)]
        failed = sum(r.status == FAIL for r in rows)
        notes.append(f"compare: {failed} regressed, {len(moved(rows)) - failed} moved within policy or new/missing, "
                     f"{sum(r.status == PASS for r in rows)} compared (regression policy {policy.version}); "
                     f"results in {a.out}")
        return Result([Part(SUITE, rows, summary_extra(base, cur, policy, base_dirs, cur_dirs), calibrators=())], notes)

"""The regression gate: compare a current results set with a baseline, cell by cell.

The tolerance policy asks "is this cell close enough to the truth?"; this module asks "did it get
worse than it was?". Cells are matched on (suite, case settings, subject, against, metric); only
gated rows (pass/fail) are compared, info rows are measured but never gate. A cell fails when

  - a finite baseline value became non-finite, or
  - current > max(factor * baseline, baseline + slack)   (suites/regression.toml), or
  - it passed its tolerance in the baseline and fails it now, or
  - it is gone from the current run (a narrowed matrix could hide a regression; --allow-missing
    turns that into info).

Every suite's results compare alike (logits, tokenizer, behaviour's sub-suites, axes, bench): a
cell whose value is not a number (a tokenizer check is pass or fail) is judged on its status alone,
and a metric where higher is better (bench's McNemar p) only on its status too.

Before anything is compared, both sides must be complete and comparable: every baseline and
current cell must hold every field a run writes (``suite`` included; exit 2 names the file, cell
and field), and the two sides must be runs of the same model (its content fingerprint), the same
inputs (seed, shapes, tasks, the logits suite's input hash) and the same tolerance policy. A
difference is refused (exit 2, naming which) unless --allow-mismatch, which turns it into a
WARNING at the top of every output. What changed between the two environments (transformers,
torch, tokenizers, lm-eval, device, harness commit) is said first everywhere:
"transformers 5.24.0 -> 5.25.0".

Results are written in the common schema (harness/store.py) as suite "compare": value = current,
tolerance = the allowed value, extra = the baseline's value and status.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import SUITES
from harness.core.datafiles import read_toml
from harness.core.errors import InputError
from harness.core.inputs import read_json
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


# Every field a run writes into a cell (harness.core.store.Row.to_dict); a baseline missing one is
# not the file a run wrote, and comparing it would match nothing or the wrong thing.
CELL_FIELDS = ("suite", "case", "subject", "against", "metric", "value", "tolerance", "status")
# Metrics where a larger value is better (a p-value: below its minimum the subjects differ): their
# numbers are not a regression by size, only a newly failing status is.
HIGHER_IS_BETTER = ("mcnemar_p",)
# What a reader must know of each side's environment, in this order.
ENV_KEYS = ("transformers", "torch", "tokenizers", "lm_eval", "device", "harness_commit")


def check_complete(dirs: list[Path], arg: str) -> None:
    """Every cell of every summary holds every field a run writes, read from the file as stored (the
    summary reader fills in a missing ``suite`` from the file's own, which would hide the damage)."""
    for d in dirs:
        file = d / "summary.json" if d.is_dir() else d
        raw = read_json(arg, file)
        cells = raw.get("cells") if isinstance(raw, dict) else None
        for i, c in enumerate(cells if isinstance(cells, list) else []):
            missing = [k for k in CELL_FIELDS if not isinstance(c, dict) or k not in c]
            if missing:
                raise InputError(f"{arg}: {file}: cells[{i}] lacks the field {', '.join(repr(k) for k in missing)} "
                                 "(an incomplete results file: rerun it rather than compare against it)")


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
                            reason=f"{b['metric']}: cell missing from the current run", extra=extra))
            continue
        rows.append(_judge(case, b, c, policy.for_metric(b["metric"]), extra))
    for key, c in cur.items():
        if key not in base:
            rows.append(Row(SUITE, {"suite": c["suite"], **c["case"], "measured_against": c["against"]},
                            c["subject"], "baseline", c["metric"], _value(c["value"]), status=INFO,
                            reason=f"{c['metric']}: new cell, no baseline to compare with"))
    return rows


def _judge(case: dict, b: dict, c: dict, allow: Allowance, extra: dict) -> Row:
    """Every reason starts with the metric it quotes: a console or report line that groups several
    metrics of one cell never puts one metric's numbers under another's name."""
    m = c["metric"]
    bv, cv = _value(b["value"]), _value(c["value"])
    row = Row(SUITE, case, c["subject"], "baseline", m, cv, extra={**extra, "current_status": c["status"]})
    shown = lambda v: "none" if v is None else f"{v:.3g}"     # noqa: E731
    if b["status"] == PASS and c["status"] == FAIL:      # whatever the numbers say, a verdict flipped
        row.tolerance = None if bv is None or not math.isfinite(bv) else allow.allowed(bv)
        row.status = FAIL
        row.reason = f"{m} newly fails its tolerance: {c.get('reason') or 'fail'} (baseline {shown(bv)}, passed)"
        return row
    if bv is None or not math.isfinite(bv) or m in HIGHER_IS_BETTER:
        # a status-only cell (no number, or a number where larger is better): only the verdict counts
        row.status = PASS
        if b["status"] == FAIL and c["status"] == PASS:
            row.reason = f"{m} passes now (failed in the baseline)"
        return row
    row.tolerance = allow.allowed(bv)
    if cv is None or not math.isfinite(cv):
        row.status, row.reason = FAIL, f"{m} became non-finite ({shown(cv)}; baseline {bv:.3g})"
    elif cv > row.tolerance:
        ratio = cv / bv if bv > 0 else math.inf
        row.status, row.reason = FAIL, (f"{m} regressed {ratio:.3g}x: {cv:.3g} > allowed {row.tolerance:.3g} "
                                        f"(baseline {bv:.3g})")
    else:
        row.status = PASS
        if bv > 0 and cv < bv / allow.factor:
            row.reason = f"{m} improved {bv / cv if cv > 0 else math.inf:.3g}x: {cv:.3g} (baseline {bv:.3g})"
    return row


def moved(rows: list[Row]) -> list[Row]:
    """Cells worth a line in the console: failures, improvements, missing and new cells."""
    return [r for r in rows if r.status == FAIL or r.reason]


# --- what the two sides are ----------------------------------------------------------------------

def _lm_eval(summary: dict) -> str | None:
    env = summary.get("environment") or {}
    return env.get("lm_eval") or env.get("lm-eval")


def side_environment(summaries: list[dict]) -> dict[str, str]:
    """Each of ENV_KEYS over one side's summaries: one value, several joined by ' / ', or 'not recorded'."""
    out = {}
    for k in ENV_KEYS:
        vals = sorted({str(v) for s in summaries
                       if (v := (_lm_eval(s) if k == "lm_eval" else (s.get("environment") or {}).get(k))) is not None})
        out[k] = " / ".join(vals) if vals else "not recorded"
    return out


def upgrade_line(base_env: dict[str, str], cur_env: dict[str, str]) -> str:
    """'transformers 5.24.0 -> 5.25.0; torch 2.13.0+cpu (same); ...': what changed, transformers first."""
    parts = []
    for k in ENV_KEYS:
        b, c = base_env.get(k, "not recorded"), cur_env.get(k, "not recorded")
        if k != "transformers" and b == c == "not recorded":
            continue
        parts.append(f"{k} {b} -> {c}" if b != c else f"{k} {b} (same)")
    return "; ".join(parts)


def _model_identity(summary: dict) -> str | None:
    """The model's content fingerprint where the run recorded it; else its config (older summaries)."""
    m = summary.get("model")
    if isinstance(m, dict):
        if m.get("fingerprint"):
            return f"fingerprint {m['fingerprint']}"
        if m.get("args"):
            return "config " + json.dumps(m["args"], sort_keys=True)
    fp = summary.get("model_fingerprint")
    return f"fingerprint {fp}" if fp else None


def _inputs_identity(summary: dict) -> str | None:
    """What the cells were measured on: the logits suite's input hash, else seed, tasks and limit."""
    inp = summary.get("inputs")
    parts = {}
    if isinstance(inp, dict) and inp.get("sha"):
        parts["inputs"] = inp["sha"]
    for k in ("seed", "tasks", "limit"):
        if summary.get(k) is not None:
            parts[k] = summary[k]
    return json.dumps(parts, sort_keys=True, default=str) if parts else None


def _policy_identity(summary: dict) -> str | None:
    v = policy_version(summary)
    return None if v == "unknown" else v


IDENTITIES = (("model", _model_identity), ("inputs", _inputs_identity), ("tolerance policy", _policy_identity))


def mismatches(baseline: list[dict], current: list[dict]) -> list[str]:
    """What makes the two sides incomparable, per suite: a different model, inputs or policy.
    A fact one side did not record is not a mismatch (an older summary)."""
    out = []
    suites_b = {s["suite"] for s in baseline}
    suites_c = {s["suite"] for s in current}
    if not suites_b & suites_c:
        out.append(f"suites: the baseline holds {', '.join(sorted(suites_b))}, the current run "
                   f"{', '.join(sorted(suites_c))}: nothing to compare")
    for suite in sorted(suites_b & suites_c):
        for what, ident in IDENTITIES:
            b = {x for s in baseline if s["suite"] == suite and (x := ident(s)) is not None}
            c = {x for s in current if s["suite"] == suite and (x := ident(s)) is not None}
            if b and c and b != c:
                out.append(f"{suite}: different {what}: baseline {_short(b)}, current {_short(c)}")
    plants = ({str(s.get("plant")) for s in baseline}, {str(s.get("plant")) for s in current})
    if plants[0] != plants[1]:
        out.append(f"planted bug: baseline {', '.join(sorted(plants[0]))}, current {', '.join(sorted(plants[1]))}")
    return out


def _short(values: set, n: int = 90) -> str:
    text = " | ".join(sorted(values))
    return text if len(text) <= n else text[:n - 3] + "..."


def summary_extra(baseline: list[dict], current: list[dict], policy: RegressionPolicy,
                  baseline_dirs: list[Path], current_dirs: list[Path], warnings: list[str] = ()) -> dict:
    base_env, cur_env = side_environment(baseline), side_environment(current)
    return {
        "upgrade": upgrade_line(base_env, cur_env),
        "warnings": list(warnings),
        "baseline": {"results": [str(p) for p in baseline_dirs], "environment": base_env,
                     "suites": sorted({s["suite"] for s in baseline}),
                     "tolerance_policy": sorted({policy_version(s) for s in baseline}),
                     "harness_commit": sorted({str(s["environment"].get("harness_commit")) for s in baseline})},
        "current": {"results": [str(p) for p in current_dirs], "environment": cur_env,
                    "suites": sorted({s["suite"] for s in current}),
                    "tolerance_policy": sorted({policy_version(s) for s in current}),
                    "harness_commit": sorted({str(s["environment"].get("harness_commit")) for s in current})},
        "policy": {"path": str(policy.path), "version": policy.version},
        "rule": "current > max(factor * baseline, baseline + slack) fails, even under the absolute tolerance",
    }


def environment_table(extra: dict) -> str:
    """report.md: the two environments side by side."""
    from harness.results.markdown import table
    b, c = extra["baseline"]["environment"], extra["current"]["environment"]
    rows = [[k, b[k], c[k], "same" if b[k] == c[k] else "changed"] for k in ENV_KEYS]
    rows += [["results", ", ".join(extra["baseline"]["results"]), ", ".join(extra["current"]["results"]), ""]]
    return table(["", "baseline", "current", ""], rows)


class Compare(Suite):
    name = "compare"
    help = "regression gate: which cells moved from a baseline, and did any get worse"

    def add_arguments(self, p) -> None:
        p.add_argument("--baseline", required=True, help="baseline results folder (any suite's, or a parent of several)")
        p.add_argument("--current", required=True, help="current results folder")
        p.add_argument("--regression-policy", help="regression policy TOML (default: suites/regression.toml)")
        p.add_argument("--allow-missing", action="store_true",
                       help="a baseline cell absent from the current run is info, not a failure")
        p.add_argument("--allow-mismatch", action="store_true",
                       help="compare even when the two sides ran a different model, inputs or tolerance policy "
                            "(default: refused, exit 2); every output then starts with a WARNING naming it")

    def run(self, a, ctx: Context) -> Result:
        policy = load_regression_policy(a.regression_policy)
        base_dirs, cur_dirs = find_results([Path(a.baseline)]), find_results([Path(a.current)])
        check_complete(base_dirs, "--baseline")
        check_complete(cur_dirs, "--current")
        base = [load_summary(d) for d in base_dirs]
        cur = [load_summary(d) for d in cur_dirs]
        differ = mismatches(base, cur)
        refused = [d for d in differ if not d.startswith("planted bug")]
        if refused and not a.allow_mismatch:
            raise InputError("--baseline / --current are not runs of the same thing: " + "; ".join(refused)
                             + " (make the baseline again, or --allow-mismatch to compare anyway)")
        warnings = [f"WARNING: baseline and current differ: {d}" for d in differ]
        rows = compare(base, cur, policy, allow_missing=a.allow_missing)
        extra = summary_extra(base, cur, policy, base_dirs, cur_dirs, warnings)
        failed = sum(r.status == FAIL for r in rows)
        notes = [f"compare: {extra['upgrade']}", *warnings]
        notes += [f"{r.status.upper():4} {r.cell_id()}: {r.reason}" for r in moved(rows)]
        notes.append(f"compare ({extra['upgrade'].split(';')[0]}): {failed} regressed, "
                     f"{len(moved(rows)) - failed} moved within policy or new/missing, "
                     f"{sum(r.status == PASS for r in rows)} compared (regression policy {policy.version}); "
                     f"results in {a.out}")
        sections = [("Baseline -> current", f"**{extra['upgrade']}**\n\n"
                     + "".join(f"> **{w}**\n\n" for w in warnings) + environment_table(extra))]
        part = Part(SUITE, rows, extra, calibrators=())
        part.sections = sections
        return Result([part], notes)

"""`llama-parity report` and `llama-parity compare`: render and gate stored results, no model run.

report:  --results DIR... --out reports/NAME  ->  index.html (self-contained), report.md, junit.xml;
         exit 1 when any suite's verdict is fail (so CI can gate on the report step too).
compare: --baseline DIR --current DIR [--out DIR]  ->  the regression gate (harness/baseline.py);
         results in the common schema, exit 1 when a cell regressed beyond suites/regression.toml.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.core.errors import InputError


def render_report(results: list[Path], out: Path, title: str = "llama-parity") -> int:
    """Write index.html, report.md and junit.xml for stored results; 1 when a suite fails, else 0.

    Public so that a suite's command can render its own report right after a run.
    """
    from harness.results import junit; from harness.results import markdown as report; from harness.results import html as report_html
    dirs = report.find_results([Path(p) for p in results])
    summaries = [report.load_summary(d) for d in dirs]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out}: exists and is not a folder")
    bases = [d if d.is_dir() else d.parent for d in dirs]
    report_html.write_html(out / "index.html", summaries, bases, title=title)
    report.atomic_write_text(out / "report.md", report.markdown_report(summaries))
    junit.write_junit(out / "junit.xml", summaries)
    failing = [s["suite"] for s in summaries if s["verdict"] == "fail"]
    print(f"report: {out}/index.html, {out}/report.md, {out}/junit.xml"
          + (f"  (failing: {', '.join(failing)})" if failing else "  (all pass)"))
    return 1 if failing else 0


def cmd_report(a: argparse.Namespace) -> int:
    return render_report(a.results, Path(a.out), a.title)


def cmd_compare(a: argparse.Namespace) -> int:
    from harness.results import regression as baseline; from harness.results import markdown as report
    from harness.core.environment import environment
    from harness.core.store import exit_code, write_results
    policy = baseline.load_regression_policy(a.regression_policy)
    base_dirs = report.find_results([Path(a.baseline)])
    cur_dirs = report.find_results([Path(a.current)])
    base = [report.load_summary(d) for d in base_dirs]
    cur = [report.load_summary(d) for d in cur_dirs]
    rows = baseline.compare(base, cur, policy, allow_missing=a.allow_missing)
    extra = baseline.summary_extra(base, cur, policy, base_dirs, cur_dirs)
    summary = write_results(Path(a.out), baseline.SUITE, rows, environment("cpu"), extra)
    report.write_markdown(Path(a.out) / "report.md", summary)
    moved = baseline.moved(rows)
    for r in moved:
        print(f"{r.status.upper():4} {r.cell_id()}: {r.reason}")
    c = summary["counts"]
    print(f"compare: {c['fail']} regressed, {len(moved) - c['fail']} moved within policy or new/missing, "
          f"{c['pass']} compared (regression policy {policy.version}); results in {a.out}")
    return exit_code(rows)


def register(sub) -> None:
    """Add `report` and `compare` to the CLI's subparsers."""
    rp = sub.add_parser("report", help="render stored results: self-contained HTML, Markdown, JUnit XML")
    rp.add_argument("--results", nargs="+", required=True,
                    help="results folders (each with summary.json, or a folder of such folders)")
    rp.add_argument("--out", required=True, help="output folder, e.g. reports/NAME")
    rp.add_argument("--title", default="llama-parity", help="page title")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="regression gate: which cells moved from a baseline, and did any get worse")
    cp.add_argument("--baseline", required=True, help="baseline results folder")
    cp.add_argument("--current", required=True, help="current results folder")
    cp.add_argument("--regression-policy", help="regression policy TOML (default: suites/regression.toml)")
    cp.add_argument("--allow-missing", action="store_true",
                    help="a baseline cell absent from the current run is info, not a failure")
    cp.add_argument("--out", default="reports/latest/compare", help="output folder")
    cp.set_defaults(func=cmd_compare)


def main(argv: list[str] | None = None) -> int:
    """These two commands on their own (what tests call; `llama-parity` exposes the same)."""
    import sys
    p = argparse.ArgumentParser(prog="llama-parity")
    register(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    try:
        return a.func(a)
    except InputError as e:
        print(f"llama-parity: error: {e}", file=sys.stderr)
        return 2

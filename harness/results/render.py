"""`llama-parity report`: the HTML page, report.md and JUnit XML of stored results, no model run
(and what a suite run's --html renders into OUT/report: the page and JUnit XML).

Exit 1 when any suite's verdict is fail, so that CI can gate on the report step too.
"""
from __future__ import annotations

from pathlib import Path

from harness.core import inputs
from harness.core.store import atomic_write_text
from harness.core.suite import Command
from harness.results import headline, html, junit
from harness.results.markdown import markdown_report
from harness.results.stored import find_results, load_summary


def render_report(results: list[Path], out: Path, title: str = "llama-parity", echo: bool = True,
                  markdown: bool = True) -> int:
    """Write index.html, junit.xml and (``markdown``) report.md for stored results; 1 when a suite
    fails, else 0. A suite run's --html passes ``markdown=False``: its report.md is the one beside
    its summary.json, and one run has one report.md. ``echo``: print what failed, where it
    diverged, the findings and the counts (a suite run has printed them already)."""
    out = inputs.out_dir(out)
    dirs = find_results([Path(p) for p in results])
    summaries = [load_summary(d) for d in dirs]      # every file checked before anything is written
    bases = [d if d.is_dir() else d.parent for d in dirs]
    html.write_html(out / "index.html", summaries, bases, title=title)
    if markdown:
        atomic_write_text(out / "report.md", markdown_report(summaries))
    junit.write_junit(out / "junit.xml", summaries)
    failing = [s["suite"] for s in summaries if s["verdict"] == "fail"]
    if not echo:
        return 1 if failing else 0
    for s in summaries:                 # exit 1 names what failed, as a suite run does
        for b in headline.banners([s]):
            print(inputs.printable(f"WARNING: {b}"))
        for c in s["cells"]:
            if c.get("status") == "fail":
                case = " ".join(f"{k}={v}" for k, v in c.get("case", {}).items())
                print(inputs.printable(f"FAIL {s['suite']} {case} {c.get('subject')} {c.get('metric')}: "
                                       f"{c.get('reason', '')}"))
        for d in headline.divergences(s):
            print(inputs.printable(f"first divergence {s['suite']} {headline.divergence_line(d)}"))
        for f in headline.findings(s):
            print(inputs.printable(f"finding {headline.finding_line(f)}"))
    files = ", ".join(f"{out}/{n}" for n in ("index.html", *(("report.md",) if markdown else ()), "junit.xml"))
    print(inputs.printable(f"report: {files}" + (f"  (failing: {', '.join(failing)})" if failing else "  (all pass)")))
    print(headline.verdict_line(summaries))
    print(headline.counts_line(summaries))
    return 1 if failing else 0


class Report(Command):
    name = "report"
    help = "render stored results: self-contained HTML, Markdown, JUnit XML"

    def add_arguments(self, p) -> None:
        p.add_argument("--results", nargs="+", required=True,
                       help="results folders (each with summary.json, or a folder of such folders)")
        p.add_argument("--out", required=True, help="output folder, e.g. reports/NAME")
        p.add_argument("--title", default="llama-parity", help="page title")

    def run(self, a, ctx=None) -> int:
        return render_report(a.results, Path(a.out), a.title)

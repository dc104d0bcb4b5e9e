"""`llama-parity report`: the HTML page, report.md and JUnit XML of stored results, no model run.

Exit 1 when any suite's verdict is fail, so that CI can gate on the report step too.
"""
from __future__ import annotations

from pathlib import Path

from harness.core import inputs
from harness.core.store import atomic_write_text
from harness.core.suite import Command
from harness.results import html, junit
from harness.results.markdown import markdown_report
from harness.results.stored import find_results, load_summary


def render_report(results: list[Path], out: Path, title: str = "llama-parity") -> int:
    """Write index.html, report.md and junit.xml for stored results; 1 when a suite fails, else 0."""
    out = inputs.out_dir(out)
    dirs = find_results([Path(p) for p in results])
    summaries = [load_summary(d) for d in dirs]      # every file checked before anything is written
    bases = [d if d.is_dir() else d.parent for d in dirs]
    html.write_html(out / "index.html", summaries, bases, title=title)
    atomic_write_text(out / "report.md", markdown_report(summaries))
    junit.write_junit(out / "junit.xml", summaries)
    failing = [s["suite"] for s in summaries if s["verdict"] == "fail"]
    for s in summaries:                 # exit 1 names what failed, as a suite run does
        for c in s["cells"]:
            if c.get("status") == "fail":
                case = " ".join(f"{k}={v}" for k, v in c.get("case", {}).items())
                print(inputs.printable(f"FAIL {s['suite']} {case} {c.get('subject')} {c.get('metric')}: "
                                       f"{c.get('reason', '')}"))
    print(inputs.printable(f"report: {out}/index.html, {out}/report.md, {out}/junit.xml"
                           + (f"  (failing: {', '.join(failing)})" if failing else "  (all pass)")))
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

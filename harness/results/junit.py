"""JUnit XML from stored results: one <testcase> per gated cell, for CI systems.

A cell here is one row of summary.json (case x subject x metric). Failing rows become <failure>
with their numbers (value, tolerance, value/tolerance, reason), where their group diverged first
and the finding that explains them, so a CI page shows why without opening the report; n/a rows
become <skipped> with their reason; info rows (measured, not gated) are not tests and are left
out. Each suite's findings are a second <testsuite> ("llama-parity.SUITE.findings"): a gated
finding is a <failure>, a known one that is not gated is <skipped> with its source. The verdict,
the counts, the first divergence and the findings are also the suite's <system-out>. The output
validates against the common junit-10.xsd (tests/data/junit-10.xsd).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from harness.results import headline
from harness.results.stored import policy_version
from harness.core.store import atomic_write_text

# XML 1.0 forbids most control characters even escaped; a tokenizer piece may hold them.
_BAD_XML = {c: f"\\x{c:02x}" for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)}
_BAD_XML.update({c: f"\\u{c:04x}" for c in (0xFFFE, 0xFFFF, *range(0xD800, 0xE000))})


def _clean(s: object) -> str:
    return str(s).translate(_BAD_XML)


def _num(x) -> str:
    return "none" if x is None else (f"{x:.6g}" if isinstance(x, (int, float)) else str(x))


def case_name(cell: dict) -> str:
    settings = ",".join(f"{k}={v}" for k, v in cell["case"].items())
    return f"[{settings}] {cell['metric']}"


def failure_text(cell: dict, summary: dict | None = None) -> str:
    """Why a cell failed: its numbers and reason, then (given its summary) where its group diverged
    first and the finding that explains it, so a CI page shows the cause without the report."""
    value, tol = cell.get("value"), cell.get("tolerance")
    ratio = ""
    if isinstance(value, (int, float)) and isinstance(tol, (int, float)) and tol > 0:
        ratio = f" (value/tolerance {value / tol:.3g})"
    text = (f"{cell['subject']} vs {cell['against']}: {cell['metric']} = {_num(value)}, "
            f"tolerance {_num(tol)}{ratio}; {cell.get('reason') or 'over tolerance'}")
    if summary is not None and isinstance(summary.get("upgrade"), str):
        text += f"; baseline -> current: {summary['upgrade']}"
    if summary is not None:
        d = headline.cell_divergence(cell, summary)
        if d is not None:
            text += f"; first divergence: {headline.divergence_point(d)}"
            detail = headline.divergence_detail(d)
            text += f" ({detail})" if detail else ""
        f = headline.cell_finding(cell, summary)
        if f is not None:
            text += f"; finding {f.get('id')} [{f.get('status')}]: {f.get('title')}"
    return text


def finding_text(f: dict) -> str:
    detail = headline.finding_detail(f)
    return headline.finding_line(f) + (f"; {detail}" if detail else "")


def testsuite(summary: dict) -> ET.Element:
    cells = [c for c in summary["cells"] if c["status"] in ("pass", "fail", "n/a")]
    suite = ET.Element("testsuite", {
        "name": _clean(f"llama-parity.{summary['suite']}"),
        "tests": str(len(cells)),
        "failures": str(sum(c["status"] == "fail" for c in cells)),
        "errors": "0",
        "skipped": str(sum(c["status"] == "n/a" for c in cells)),
    })
    props = ET.SubElement(suite, "properties")
    env = summary.get("environment", {})
    found = headline.divergences(summary)
    for key, value in (("verdict", summary["verdict"]), ("tolerance_policy", policy_version(summary)),
                       ("seed", summary.get("seed")), ("torch", env.get("torch")),
                       ("transformers", env.get("transformers")), ("device", env.get("device")),
                       ("harness_commit", env.get("harness_commit"))):
        ET.SubElement(props, "property", {"name": key, "value": _clean(value)})
    for key, value in (("first_divergence", headline.divergence_line(found[0]) if found else ""),
                       ("untested_release", headline.banner(summary)),
                       ("baseline_to_current", summary.get("upgrade") if isinstance(summary.get("upgrade"), str) else "")):
        if value:
            ET.SubElement(props, "property", {"name": key, "value": _clean(value)})
    for c in cells:
        tc = ET.SubElement(suite, "testcase", {
            "classname": _clean(f"llama_parity.{summary['suite']}.{c['subject']}_vs_{c['against']}"),
            "name": _clean(case_name(c)), "time": "0"})
        if c["status"] == "fail":
            text = failure_text(c, summary)
            ET.SubElement(tc, "failure", {"type": "ParityFailure", "message": _clean(text)}).text = _clean(text)
        elif c["status"] == "n/a":
            ET.SubElement(tc, "skipped", {"message": _clean(c.get("reason") or "not applicable")})
    out = [headline.verdict_line([summary]), headline.counts_line([summary])]
    out = [headline.banner(summary)] * bool(headline.banner(summary)) + headline.upgrade(summary) + out
    out += [f"first divergence: {headline.divergence_line(d)}" for d in found]
    out += [f"finding {headline.finding_line(f)}" for f in headline.findings(summary)]
    ET.SubElement(suite, "system-out").text = _clean("\n".join(out))
    return suite


def findings_suite(summary: dict) -> ET.Element | None:
    """The findings of a suite as test cases of their own: a gated finding fails (so a CI page
    lists the mechanism once, not only its cells), a known one not gated is skipped with its
    reason: visible, not failing."""
    found = headline.findings(summary)
    if not found:
        return None
    suite = ET.Element("testsuite", {
        "name": _clean(f"llama-parity.{summary['suite']}.findings"),
        "tests": str(len(found)),
        "failures": str(sum(bool(f.get("gated")) for f in found)),
        "errors": "0",
        "skipped": str(sum(not f.get("gated") for f in found)),
    })
    for f in found:
        tc = ET.SubElement(suite, "testcase", {
            "classname": _clean(f"llama_parity.{summary['suite']}.findings"),
            "name": _clean(f"{f.get('id')} [{f.get('status')}]"), "time": "0"})
        text = finding_text(f)
        if f.get("gated"):
            ET.SubElement(tc, "failure", {"type": "ParityFinding", "message": _clean(text)}).text = _clean(text)
        else:
            ET.SubElement(tc, "skipped", {"message": _clean(f"not gated: {text}")})
    return suite


def junit_xml(summaries: list[dict]) -> str:
    root = ET.Element("testsuites", {"name": "llama-parity"})
    for s in summaries:
        root.append(testsuite(s))
        found = findings_suite(s)
        if found is not None:
            root.append(found)
    root.set("tests", str(sum(int(t.get("tests")) for t in root)))
    root.set("failures", str(sum(int(t.get("failures")) for t in root)))
    root.set("errors", "0")
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, summaries: list[dict]) -> None:
    atomic_write_text(Path(path), junit_xml(summaries))

"""Merge per-release results into one matrix: release x suite x case.

Input: ``ROOT/<run>/`` folders written by ``scripts/matrix.sh run`` under each transformers release,
holding one ``<suite>/summary.json`` per suite run and optionally ``pytest.xml`` (JUnit). The
release is read from each summary's ``environment`` block, never from the folder name.
Output: ``ROOT/matrix.csv`` (every row of every run, long format) and ``ROOT/matrix.md`` (one
table per suite: a row per case, a column per release, the key metric and any non-pass status).

Only pandas and the standard library: the tox ``matrix`` env installs nothing else.
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from harness.core.errors import InputError
from harness.core.inputs import printable
from harness.core.store import atomic_write_text
from harness.core.suite import Command
from harness.results.markdown import md_escape

KEY_METRICS = ("rel_l2", "max_abs", "all")   # the metric shown in the .md, first present wins
FAILING_SHOWN = 20                           # failing rows printed by `llama-parity matrix` (exit 1)


def _release_key(version: str) -> tuple:
    # ASCII digits only: "²".isdigit() is true and int("²") raises (a tampered summary's version).
    return tuple(int(p) if p.isascii() and p.isdigit() and len(p) < 10 else 0 for p in str(version).split(".")[:3])


def _case_str(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items() if k != "device")


def read_summary(path: Path) -> dict:
    from harness.results.stored import load_summary
    return load_summary(path)


def read_junit(path: Path) -> list[dict]:
    """JUnit XML -> one record per test: pass / fail / n/a (skipped, with pytest's reason)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise InputError(f"{path}: not readable JUnit XML ({e})") from None
    out = []
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        status, reason = "pass", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                status, reason = "fail", (child.get("message") or "")[:300]
            elif child.tag == "skipped":
                status, reason = "n/a", (child.get("message") or "skipped")[:300]
        out.append({"case": name, "status": status, "reason": reason})
    return out


def collect(root: Path) -> pd.DataFrame:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--root: {root}: no such folder")
    records = []
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        release = None
        for summary_path in sorted(run_dir.rglob("summary.json")):   # behaviour/cache, axes/cast, ...
            summary = read_summary(summary_path)
            release = str(summary["environment"].get("transformers") or "unknown")
            suite = summary_path.parent.relative_to(run_dir).as_posix()
            for c in summary["cells"]:
                records.append({"release": release, "run": run_dir.name, "suite": suite,
                                "case": _case_str(c["case"]), "subject": c["subject"], "against": c["against"],
                                "metric": c["metric"], "value": c["value"], "status": c["status"],
                                "reason": str(c.get("reason") or "")})
        junit = run_dir / "pytest.xml"
        if junit.exists():
            release = release or run_dir.name.removeprefix("transformers-")
            for t in read_junit(junit):
                records.append({"release": release, "run": run_dir.name, "suite": "pytest", "case": t["case"],
                                "subject": "-", "against": "-", "metric": "outcome", "value": None,
                                "status": t["status"], "reason": t["reason"]})
    if not records:
        raise InputError(f"--root: {root}: no <run>/<suite>/summary.json or <run>/pytest.xml found")
    return pd.DataFrame.from_records(records)


def _cell(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "not run"
    for metric in KEY_METRICS:
        hit = rows[rows.metric == metric]
        if not hit.empty:
            r = hit.iloc[0]
            value = r.value
            text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else (
                f"{value:.3g}" if isinstance(value, (int, float)) else str(value))
            status = r.status if r.status not in ("pass", "info") else ""
            return " ".join(p for p in (text, status) if p) or r.status
    return rows.iloc[0].status


def render_markdown(frame: pd.DataFrame) -> str:
    releases = sorted(frame.release.unique(), key=_release_key)
    lines = ["# transformers version matrix", "",
             f"Releases: {', '.join(releases)}. One table per suite; a cell shows the key metric "
             f"({' / '.join(KEY_METRICS[:2])}) and its status when not pass. `n/a` reasons are listed "
             "below each table. Every row of every run is in `matrix.csv`.", ""]
    for suite in sorted(s for s in frame.suite.unique() if s != "pytest"):
        part = frame[(frame.suite == suite) & (frame.subject != "reference") & (frame.against != "reference")]
        lines += [f"## {suite}", "", "| case | subject vs against | " + " | ".join(releases) + " |",
                  "|---|---|" + "---|" * len(releases)]
        keys = part[["case", "subject", "against"]].drop_duplicates().itertuples(index=False)
        for case, subject, against in keys:
            sel = part[(part.case == case) & (part.subject == subject) & (part.against == against)]
            cells = [_cell(sel[sel.release == rel]) for rel in releases]
            lines.append(f"| {md_escape(case)} | {subject} vs {against} | " + " | ".join(cells) + " |")
        reasons = part[part.status == "n/a"][["release", "reason"]].drop_duplicates()
        for rel, reason in reasons.itertuples(index=False):
            lines.append(f"- n/a at {rel}: {md_escape(reason)}")
        lines.append("")
    tests = frame[frame.suite == "pytest"]
    if not tests.empty:
        lines += ["## pytest", "", "| release | pass | fail | n/a |", "|---|---|---|---|"]
        for rel in releases:
            t = tests[tests.release == rel]
            if t.empty:
                lines.append(f"| {rel} | not run | | |")
                continue
            lines.append(f"| {rel} | {(t.status == 'pass').sum()} | {(t.status == 'fail').sum()} | "
                         f"{(t.status == 'n/a').sum()} |")
        differing = [(case, g) for case, g in tests.groupby("case") if g.status.nunique() > 1 or (g.status == "fail").any()]
        if differing:
            lines += ["", "Tests whose outcome depends on the release (or that fail):", ""]
            for case, g in differing:
                outcomes = "; ".join(f"{r.release}: {r.status}" + (f" ({md_escape(r.reason[:120])})" if r.reason else "")
                                     for r in g.sort_values("release", key=lambda s: s.map(_release_key)).itertuples())
                lines.append(f"- `{case}`: {outcomes}")
        lines.append("")
    return "\n".join(lines)


def merge(root: Path) -> pd.DataFrame:
    frame = collect(root)
    atomic_write_text(Path(root) / "matrix.csv", frame.to_csv(index=False, float_format="%.9g"))
    atomic_write_text(Path(root) / "matrix.md", render_markdown(frame))
    return frame


class Matrix(Command):
    name = "matrix"
    help = "merge per-release results into one release x suite x case matrix"

    def add_arguments(self, p) -> None:
        p.add_argument("--root", default="reports/matrix", help="folder of per-release result folders")

    def run(self, a, ctx=None) -> int:
        frame = merge(Path(a.root))
        releases = sorted(frame.release.unique(), key=_release_key)
        print(printable(f"merged {len(frame)} rows from {len(releases)} release(s) ({', '.join(releases)}) into "
                        f"{a.root}/matrix.csv and {a.root}/matrix.md"))
        failing = frame[frame.status == "fail"]
        for r in failing.head(FAILING_SHOWN).itertuples(index=False):
            print(printable(f"FAIL {r.release} {r.run}/{r.suite} [{r.case}] {r.subject} vs {r.against}: {r.metric}"
                            + (f": {r.reason[:200]}" if r.reason else "")))
        if len(failing) > FAILING_SHOWN:
            print(f"... and {len(failing) - FAILING_SHOWN} more failing rows (matrix.csv has them all)")
        return 1 if len(failing) else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.results.matrix --root DIR`: the tox matrix env runs this with pandas alone."""
    p = argparse.ArgumentParser(prog="python -m harness.results.matrix", description=__doc__.splitlines()[0])
    Matrix().add_arguments(p)
    a = p.parse_args(argv)
    try:
        return Matrix().run(a)
    except InputError as e:
        print(f"matrix: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

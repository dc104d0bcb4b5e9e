"""Human-readable views of a summary: the console table and report.md, one writer for every suite.

Both are rendered from summary.json's content only, so they can be rebuilt without a model run.
A suite adds its own sections (the mp claims, the bench scores, a localisation curve) as
Markdown handed back in its Result; everything that came from a model, a tokenizer or a file
goes through ``md_escape`` first, so that text cannot become markup.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from harness.core.inputs import printable
from harness.core.store import atomic_write_text
from harness.results import headline
from harness.results.stored import environment_items, policy_version

GATED = ("pass", "fail")
_MD_SPECIAL = {c: "\\" + c for c in "\\`[]|"}
_MD_SPECIAL.update({"<": "&lt;", ">": "&gt;", "&": "&amp;", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def md_escape(x) -> str:
    """Text for a Markdown cell or line: no tags, links, code spans, table breaks or raw control
    characters (shown as \\n, \\xNN) survive."""
    s = "" if x is None else str(x)
    out = []
    for ch in s:
        if ch in _MD_SPECIAL:
            out.append(_MD_SPECIAL[ch])
        elif ord(ch) < 0x20 or 0x7f <= ord(ch) < 0xa0 or 0xd800 <= ord(ch) < 0xe000:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _cells_frame(summary: dict) -> pd.DataFrame:
    records = []
    for c in summary["cells"]:
        rec = dict(c["case"])
        rec.update({k: c.get(k) for k in ("subject", "against", "metric", "value", "tolerance", "status", "reason")})
        records.append(rec)
    return pd.DataFrame.from_records(records)


def margin(value, tol) -> float | None:
    if value is None or tol is None:
        return None
    try:
        v, t = float(value), float(tol)
    except (TypeError, ValueError):
        return None
    if t != t:   # no tolerance (n/a rows): no ratio
        return None
    return v / t if t > 0 else (0.0 if v == 0 else float("inf"))


def worst_cells(summary: dict) -> pd.DataFrame:
    """One line per (case, subject, against): the status and the metric closest to its limit."""
    df = _cells_frame(summary)
    if df.empty:
        return df
    case_cols = list(dict.fromkeys(k for c in summary["cells"] for k in c["case"]))
    df[case_cols] = df[case_cols].astype(object).where(df[case_cols].notna(), "")
    df["ratio"] = [margin(v, t) for v, t in zip(df["value"], df["tolerance"])]
    lines = []
    for key, g in df.groupby(case_cols + ["subject", "against"], sort=False, dropna=False):
        # a cell is as gated as its most gated row: one passing metric beside info rows is a passing cell
        status = next(s for s in ("fail", "pass", "n/a", "info") if (g["status"] == s).any())
        # a failing cell shows one of its failing metrics (never a passing one beside the failing reason)
        pool = g[g["status"] == "fail"] if status == "fail" else g
        judged = pool[pool["ratio"].notna() & pool["status"].isin(GATED)]
        judged = judged if not judged.empty else pool[pool["ratio"].notna()]
        worst = judged.loc[judged["ratio"].idxmax()] if not judged.empty else pool.iloc[0]
        failing = g[g["status"] == "fail"]
        # each reason under its own metric's name when more than one metric fails (or another is shown)
        named = len(set(failing["metric"])) > 1 or (not failing.empty and worst["metric"] not in set(failing["metric"]))
        reasons = "; ".join(sorted({(f"{m}: {r}" if named and not str(r).startswith(str(m)) else str(r))
                                    for m, r in zip(failing["metric"], failing["reason"]) if r}))
        lines.append({**dict(zip(case_cols + ["subject", "against"], key)), "status": status,
                      "worst metric": worst["metric"], "value": worst["value"], "tolerance": worst["tolerance"],
                      "value/tol": worst["ratio"], "reason": reasons or (worst["reason"] if status != "pass" else "")})
    out = pd.DataFrame(lines)
    order = {"fail": 0, "pass": 1, "n/a": 2, "info": 3}
    return out.sort_values("status", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "" if x is None else str(x)


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no cells)_\n"
    head = "| " + " | ".join(md_escape(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    # A cell that measured nothing (n/a) has NaN values: blank. A failing cell's NaN is the finding.
    status = list(df.columns).index("status") if "status" in df.columns else None
    body = ["| " + " | ".join(
        md_escape("" if isinstance(v, float) and not math.isfinite(v) and status is not None and row[status] != "fail"
                  else _fmt(v)) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table of already-chosen values (escaped here)."""
    return markdown_table(pd.DataFrame(rows, columns=headers))


FACTS = ("model", "truth", "seed", "policy", "plant", "text")


def headline_markdown(summary: dict, heading: str = "##") -> list[str]:
    """What a reader needs before any table: where a failing run diverged, and its findings."""
    lines: list[str] = []
    found = headline.divergences(summary)
    if found:
        lines += [f"**First divergence** (`first_divergence` in summary.json): "
                  f"{md_escape(headline.divergence_line(found[0]))}", ""]
        if len(found) > 1:
            lines += [f"- {md_escape(headline.divergence_line(d))}" for d in found[1:]] + [""]
    lines += findings_markdown(headline.findings(summary), heading)
    return lines


def findings_markdown(found: list[dict], heading: str = "##") -> list[str]:
    if not found:
        return []
    new = sum(f.get("status") == "new" for f in found)
    gated = sum(bool(f.get("gated")) for f in found)
    rows = [[f.get("id"), f"{f.get('status')} (your {f['accepted_by']})" if f.get("accepted_by") else f.get("status"),
             "yes" if f.get("gated") else "no", f.get("cells"), f.get("title"),
             f.get("releases") or "-", f.get("seen_on") or "-", f.get("differs") or "", f.get("reproduction") or "",
             f.get("source") or ""] for f in found]
    return [f"{heading} Findings ({len(found)}: {new} new, {len(found) - new} known; {gated} fail the run)", "",
            table(["finding", "status", "fails the run", "cells", "what", "releases", "seen on", "differs",
                   "reproduction", "source"], rows)]


def render(summary: dict, sections: list[tuple[str, str]] = ()) -> str:
    """The report.md of one results folder: the canonical Markdown report of a suite's run."""
    env = summary["environment"]
    lines = [f"# llama-parity {md_escape(summary['suite'])}: **{md_escape(summary['verdict']).upper()}**", ""]
    if headline.banner(summary):
        lines += [f"> **Warning**: {md_escape(headline.banner(summary))}", ""]
    lines += [f"**{md_escape(line)}**\n" for line in headline.upgrade(summary)]
    lines += [f"{headline.counts_line([summary])} (rows are case x subject x metric; skipped: n/a, not run).", ""]
    lines += headline_markdown(summary)
    lines += ["## Environment", "",
              markdown_table(pd.DataFrame([{k: env.get(k) for k in ("torch", "transformers", "device", "python",
                                                                      "platform", "harness_commit")}]))]
    for key in FACTS:
        if key in summary:
            value = summary[key] if isinstance(summary[key], str) else json.dumps(summary[key], default=str)
            lines.append(f"- **{key}**: {md_escape(value)}")
    for title, text in sections:
        lines += ["", f"## {md_escape(title)}", "", text]
    lines += ["", "## Cells (failing first; worst metric of each cell)", "", markdown_table(worst_cells(summary))]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, summary: dict, sections: list[tuple[str, str]] = ()) -> None:
    atomic_write_text(path, render(summary, sections))


MAX_FAILING_SHOWN = 40     # beyond this the findings say what the failing cells have in common
CONSOLE = {"display.width": 200, "display.max_columns": 20, "display.max_rows": 500, "display.max_colwidth": 70,
           "display.float_format": "{:.3g}".format}


def print_console(summary: dict, verbose: bool = False, name: str = "") -> None:
    """One suite's part of the console: its verdict, failing cells, where they diverge, its
    findings, why rows were not run. ``verbose``: every cell (passing, n/a and info rows too).
    ``name``: what the part is called, e.g. 'behaviour/padding' (default: its suite)."""
    out = lambda line="": print(printable(line))       # noqa: E731 - paths and pieces may not be UTF-8
    out(f"llama-parity {name or summary['suite']}: {summary['verdict'].upper()}")
    if headline.banner(summary):
        out(f"WARNING: {headline.banner(summary)}")
    for line in headline.upgrade(summary):
        out(line)
    cells = worst_cells(summary)
    if not cells.empty:
        with pd.option_context(*[x for kv in CONSOLE.items() for x in kv]):
            if verbose:
                out(f"\ncells ({len(cells)}; worst metric of each):")
                out(cells.to_string(index=False))
            failing = cells[cells["status"] == "fail"]
            if not failing.empty:
                shown = failing if verbose else failing.head(MAX_FAILING_SHOWN)
                more = "" if len(shown) == len(failing) else \
                    f"; the first {len(shown)}: all are in report.md and results.csv, --verbose prints them"
                out(f"\nFAILING cells ({len(failing)}; worst metric of each{more}):")
                out(shown.to_string(index=False))
    found = headline.divergences(summary)
    if found:
        out(f"\nfirst divergence{'s, one per failing group' if len(found) > 1 else ''}:")
        for d in found:
            out(f"  {headline.divergence_line(d)}")
    finds = headline.findings(summary)
    if finds:
        new = sum(f.get("status") == "new" for f in finds)
        out(f"\nfindings ({len(finds)}: {new} new, {len(finds) - new} known):")
        for f in finds:
            out(f"  {headline.finding_line(f)}")
    reasons = headline.na_reasons(summary)
    if reasons and not verbose:
        out(f"\nskipped (n/a, not run): {sum(n for _, n in reasons)} rows")
        for reason, n in reasons[:10]:
            out(f"  {n} x {reason}")
        if len(reasons) > 10:
            out(f"  ... and {len(reasons) - 10} more reasons (--verbose lists every row)")


def print_totals(summaries: list[dict]) -> None:
    """The last two lines of a run: the verdict in words, then pytest's counts line."""
    print(headline.verdict_line(summaries))
    print(headline.counts_line(summaries))


def markdown_report(summaries: list[dict], regression_note: str = "") -> str:
    """One Markdown page over several stored results (`llama-parity report`), for a pull request:
    verdict, banner, counts, then per suite where it diverged, its findings and its cells."""
    overall = "fail" if any(s["verdict"] == "fail" for s in summaries) else "pass"
    lines = [f"# llama-parity: **{overall.upper()}**", ""]
    lines += [f"> **Warning**: {md_escape(b)}" for b in headline.banners(summaries)]
    lines += [""] if headline.banners(summaries) else []
    lines += [f"{headline.counts_line(summaries)} (rows are case x subject x metric; skipped: n/a, not run).", ""]
    for s in summaries:
        lines.append(f"- **{md_escape(s['suite'])}**: {md_escape(s['verdict']).upper()} "
                     f"({md_escape(headline.counts_line([s]))}; policy {md_escape(policy_version(s))})")
    if regression_note:
        lines += ["", md_escape(regression_note)]
    for s in summaries:
        head = headline_markdown(s, heading="###")
        if head:
            lines += ["", f"## {md_escape(s['suite'])}: where it diverged, what was found", "", *head]
    lines += ["", "## Environment", "", "| key | value |", "|---|---|"]
    lines += [f"| {md_escape(k)} | {md_escape(v)} |" for k, v in environment_items(summaries[0])]
    for s in summaries:
        t = worst_cells(s)
        if not t.empty:
            t = t[t["status"] != "info"]
        lines += ["", f"## {md_escape(s['suite'])} (failing first; worst metric of each cell)", "", markdown_table(t)]
    return "\n".join(lines) + "\n"

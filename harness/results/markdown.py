"""Human-readable views of a summary: the console table and report.md, one writer for every suite.

Both are rendered from summary.json's content only, so they can be rebuilt without a model run.
A suite adds its own sections (the mp claims, the bench scores, a localisation curve) as
Markdown handed back in its Result; everything that came from a model, a tokenizer or a file
goes through ``md_escape`` first, so that text cannot become markup.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from harness.core.store import atomic_write_text
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
        status = "fail" if (g["status"] == "fail").any() else g["status"].iloc[0]
        gated = g[g["ratio"].notna()]
        worst = gated.loc[gated["ratio"].idxmax()] if not gated.empty else g.iloc[0]
        reasons = "; ".join(sorted({str(r) for r in g.loc[g["status"] == "fail", "reason"] if r}))
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
    body = ["| " + " | ".join(md_escape(_fmt(v)) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table of already-chosen values (escaped here)."""
    return markdown_table(pd.DataFrame(rows, columns=headers))


FACTS = ("model", "truth", "seed", "policy", "plant", "first_divergence")


def render(summary: dict, sections: list[tuple[str, str]] = ()) -> str:
    env = summary["environment"]
    counts = summary["counts"]
    lines = [
        f"# llama-parity {md_escape(summary['suite'])}: **{md_escape(summary['verdict']).upper()}**", "",
        f"{counts.get('fail', 0)} failing, {counts.get('pass', 0)} passing, {counts.get('n/a', 0)} not applicable "
        f"(rows are case x subject x metric).", "",
        "## Environment", "",
        markdown_table(pd.DataFrame([{k: env.get(k) for k in ("torch", "transformers", "device", "python", "platform",
                                                                "harness_commit")}])),
    ]
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


def print_console(summary: dict) -> None:
    table = worst_cells(summary)
    if not table.empty:
        failing = table[table["status"] == "fail"]
        shown = table[table["status"] != "info"]
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 200,
                               "display.max_colwidth", 70, "display.float_format", "{:.3g}".format):
            print(shown.to_string(index=False))
            if not failing.empty:
                print(f"\nFAILING cells ({len(failing)}):")
                print(failing.to_string(index=False))
    for f in summary.get("findings") or []:
        print(finding_line(f))
    print(f"\nverdict: {summary['verdict']}  ({summary['counts']})")


def finding_line(f: dict) -> str:
    """One finding in one line: status, cells, title, where it was seen (console, report.md)."""
    gate = "fails the run" if f.get("gated") else "not gated"
    return f"finding [{f.get('status')}, {gate}] {f.get('id')}: {f.get('title')} ({f.get('cells')} cells)"


def markdown_report(summaries: list[dict], regression_note: str = "") -> str:
    """One Markdown page over several suites, for a pull request: verdict, environment, cells."""
    overall = "fail" if any(s["verdict"] == "fail" for s in summaries) else "pass"
    lines = [f"# llama-parity: **{overall.upper()}**", ""]
    for s in summaries:
        c = s["counts"]
        lines.append(f"- **{md_escape(s['suite'])}**: {md_escape(s['verdict']).upper()} ({c.get('fail', 0)} failing, "
                     f"{c.get('pass', 0)} passing, {c.get('n/a', 0)} n/a; policy "
                     f"{md_escape(policy_version(s))})")
    if regression_note:
        lines += ["", md_escape(regression_note)]
    lines += ["", "## Environment", "", "| key | value |", "|---|---|"]
    lines += [f"| {md_escape(k)} | {md_escape(v)} |" for k, v in environment_items(summaries[0])]
    for s in summaries:
        t = worst_cells(s)
        if not t.empty:
            t = t[t["status"] != "info"]
        lines += ["", f"## {md_escape(s['suite'])} (failing first; worst metric of each cell)", "", markdown_table(t)]
    return "\n".join(lines) + "\n"

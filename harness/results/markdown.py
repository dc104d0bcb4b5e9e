"""Human-readable views of a summary: a console table and a Markdown report.

Both are rendered from summary.json's content only, so they can be rebuilt without a model run.
Markdown cells are escaped: strings that came from a model or tokenizer must not become markup.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from harness.core.store import atomic_write_text

GATED = ("pass", "fail")


def _cells_frame(summary: dict) -> pd.DataFrame:
    records = []
    for c in summary["cells"]:
        rec = dict(c["case"])
        rec.update({k: c[k] for k in ("subject", "against", "metric", "value", "tolerance", "status", "reason")})
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _margin(value, tol) -> float | None:
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
    case_cols = list(summary["cells"][0]["case"].keys())
    df["ratio"] = [_margin(v, t) for v, t in zip(df["value"], df["tolerance"])]
    lines = []
    for key, g in df.groupby(case_cols + ["subject", "against"], sort=False, dropna=False):
        status = "fail" if (g["status"] == "fail").any() else g["status"].iloc[0]
        gated = g[g["ratio"].notna()]
        worst = gated.loc[gated["ratio"].idxmax()] if not gated.empty else g.iloc[0]
        reasons = "; ".join(sorted({r for r in g.loc[g["status"] == "fail", "reason"] if r}))
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


def _md_escape(s: str) -> str:
    return html.escape(s, quote=False).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no cells)_\n"
    head = "| " + " | ".join(_md_escape(str(c)) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(_md_escape(_fmt(v)) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def write_markdown(path: Path, summary: dict) -> None:
    env = summary["environment"]
    counts = summary["counts"]
    lines = [
        f"# llama-parity {summary['suite']}: **{summary['verdict'].upper()}**", "",
        f"{counts.get('fail', 0)} failing, {counts.get('pass', 0)} passing, {counts.get('n/a', 0)} not applicable "
        f"(rows are case x subject x metric).", "",
        "## Environment", "",
        markdown_table(pd.DataFrame([{k: env.get(k) for k in ("torch", "transformers", "device", "python", "platform",
                                                                "harness_commit")}])),
    ]
    for key in ("model", "truth", "seed", "policy", "plant", "first_divergence"):
        if key in summary:
            lines.append(f"- **{key}**: `{_md_escape(str(summary[key]))}`")
    lines += ["", "## Cells (failing first; worst metric of each cell)", "", markdown_table(worst_cells(summary))]
    atomic_write_text(path, "\n".join(lines) + "\n")


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
    print(f"\nverdict: {summary['verdict']}  ({summary['counts']})")


# --- reading stored results back, for `llama-parity report` / `compare` (no model run) ------------

def load_summary(path: Path) -> dict:
    """summary.json of one results folder (or the file itself), checked enough to render."""
    import json
    from harness.core.errors import InputError
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"--results: {path}: no summary.json there")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    for key in ("suite", "verdict", "counts", "environment", "cells"):
        if key not in summary:
            raise InputError(f"{file}: missing key {key!r} (not a llama-parity summary)")
    for i, c in enumerate(summary["cells"]):
        missing = [k for k in ("case", "subject", "against", "metric", "value", "tolerance", "status") if k not in c]
        if missing:
            raise InputError(f"{file}: cells[{i}] lacks {', '.join(missing)}")
    return summary


def find_results(paths: list[Path]) -> list[Path]:
    """Results folders under each path: the path itself when it holds summary.json, else its children."""
    from harness.core.errors import InputError
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() or (p / "summary.json").is_file():
            found.append(p)
            continue
        if not p.is_dir():
            raise InputError(f"--results: {p}: no such folder")
        children = sorted(c.parent for c in p.glob("*/summary.json"))
        if not children:
            raise InputError(f"--results: {p}: no summary.json in it or in its subfolders")
        found += children
    return found


def policy_version(summary: dict) -> str:
    """The tolerance policy version a summary was judged with (suites spell it two ways)."""
    pol = summary.get("policy")
    if isinstance(pol, dict) and pol.get("version"):
        return str(pol["version"])
    return str(summary.get("policy_version") or "unknown")


ENV_KEYS = ("device", "gpu", "machine", "processor", "platform", "python", "torch", "transformers",
            "tokenizers", "cuda", "torch_threads", "harness_commit")


def environment_items(summary: dict) -> list[tuple[str, str]]:
    """What a reader needs to reproduce the run, in reading order (verdict comes before this)."""
    env = summary.get("environment", {})
    items = [(k, env[k]) for k in ENV_KEYS if env.get(k) is not None]
    support = env.get("dtype_support")
    if isinstance(support, dict):
        items.append(("dtype support", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in support.items())))
    items.append(("seed", summary.get("seed", "not recorded")))
    items.append(("tolerance policy", policy_version(summary)))
    return [(k, _fmt(v)) for k, v in items]


def markdown_report(summaries: list[dict], regression_note: str = "") -> str:
    """One Markdown page over several suites, for a pull request: verdict, environment, cells."""
    overall = "fail" if any(s["verdict"] == "fail" for s in summaries) else "pass"
    lines = [f"# llama-parity: **{overall.upper()}**", ""]
    for s in summaries:
        c = s["counts"]
        lines.append(f"- **{_md_escape(str(s['suite']))}**: {s['verdict'].upper()} ({c.get('fail', 0)} failing, "
                     f"{c.get('pass', 0)} passing, {c.get('n/a', 0)} n/a; policy "
                     f"`{_md_escape(policy_version(s))}`)")
    if regression_note:
        lines += ["", _md_escape(regression_note)]
    lines += ["", "## Environment", "", "| key | value |", "|---|---|"]
    lines += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in environment_items(summaries[0])]
    for s in summaries:
        table = worst_cells(s)
        if not table.empty:
            table = table[table["status"] != "info"]
        lines += ["", f"## {_md_escape(str(s['suite']))} (failing first; worst metric of each cell)", "",
                  markdown_table(table)]
    return "\n".join(lines) + "\n"

"""report.md for a bench run: both subjects' scores side by side, then the paired view per task."""
from __future__ import annotations

from pathlib import Path

from harness.core.store import atomic_write_text


def _cell(x) -> str:
    """Markdown table cell: escape what could break the table or inject markup."""
    s = f"{x:.6g}" if isinstance(x, float) else str(x)
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
             .replace("\n", " "))


def write_report(out: Path, summary: dict) -> Path:
    lines = [f"# llama-parity bench: {summary['verdict'].upper()}", "",
             f"model `{_cell(summary.get('model'))}`, tasks {_cell(', '.join(summary.get('tasks', [])))}, "
             f"limit {_cell(summary.get('limit'))}, policy {_cell(summary.get('policy_version'))}"
             + (f", planted fault **{_cell(summary['fault'])}**" if summary.get("fault") else ""), "",
             "## Scores", "", "| subject | settings | task | metric | value | stderr |", "|---|---|---|---|---|---|"]
    subjects = summary.get("subjects", {})
    for name, s in subjects.items():
        st = s["settings"]
        settings = f"{st.get('dtype')}, bs {st.get('batch_size')}, bos {st.get('bos')}"
        for task, metrics in s["scores"].items():
            for key, value in metrics.items():
                if "stderr" in key or "," not in key:
                    continue
                se = metrics.get(key.replace(",", "_stderr,"))
                lines.append(f"| {_cell(name)} | {_cell(settings)} | {_cell(task)} | {_cell(key.split(',')[0])} "
                             f"| {_cell(float(value))} | {_cell(se if se is not None else '')} |")
    lines += ["", "## Paired comparisons (per document)", "",
              "| subject | against | task | metric | value | limit | status | note |", "|---|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        if c["against"] == "score" or c["against"].startswith("chance"):
            continue
        extra = c.get("extra", {})
        note = c["reason"]
        if c["metric"] in ("mcnemar_p",) and "mcnemar_b" in extra:
            note = f"discordant {extra['mcnemar_b']}/{extra['mcnemar_c']}; {note}"
        lines.append(f"| {_cell(c['subject'])} | {_cell(c['against'])} | {_cell(c['case'].get('task'))} | "
                     f"{_cell(c['metric'])} | {_cell(c['value'])} | {_cell(c['tolerance'] if c['tolerance'] is not None else '')} | "
                     f"{_cell(c['status'])} | {_cell(note)} |")
    chance = [c for c in summary["cells"] if c["metric"] == "acc_above_chance_p"]
    if chance:
        lines += ["", "## Above chance", "", "| subject | task | correct / docs | p (one-sided binomial) |",
                  "|---|---|---|---|"]
        for c in chance:
            e = c.get("extra", {})
            lines.append(f"| {_cell(c['subject'])} | {_cell(c['case']['task'])} | {e.get('correct')}/{e.get('docs')} "
                         f"| {_cell(c['value'])} |")
    path = Path(out) / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

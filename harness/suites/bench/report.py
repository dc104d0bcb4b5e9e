"""report.md sections of a bench run: both subjects' scores side by side, the paired view per task,
and each subject's accuracy against chance."""
from __future__ import annotations

from harness.core.store import Row
from harness.results.markdown import md_escape


def _cell(x) -> str:
    return md_escape(f"{x:.6g}" if isinstance(x, float) else x)


def sections(summary: dict, rows: list[Row]) -> list[tuple[str, str]]:
    scores = ["| subject | settings | task | metric | value | stderr |", "|---|---|---|---|---|---|"]
    for name, s in summary.get("subjects", {}).items():
        st = s["settings"]
        settings = f"{st.get('dtype')}, bs {st.get('batch_size')}, bos {st.get('bos')}"
        for task, metrics in s["scores"].items():
            for key, value in metrics.items():
                if "stderr" in key or "," not in key:
                    continue
                se = metrics.get(key.replace(",", "_stderr,"))
                scores.append(f"| {_cell(name)} | {_cell(settings)} | {_cell(task)} | {_cell(key.split(',')[0])} "
                              f"| {_cell(float(value))} | {_cell(se if se is not None else '')} |")
    paired = ["| subject | against | task | metric | value | limit | status | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.against == "score" or r.against.startswith("chance"):
            continue
        note = r.reason
        if r.metric == "mcnemar_p" and "mcnemar_b" in r.extra:
            note = f"discordant {r.extra['mcnemar_b']}/{r.extra['mcnemar_c']}; {note}"
        paired.append(f"| {_cell(r.subject)} | {_cell(r.against)} | {_cell(r.case.get('task'))} | {_cell(r.metric)} "
                      f"| {_cell(r.value)} | {_cell(r.tolerance if r.tolerance is not None else '')} "
                      f"| {_cell(r.status)} | {_cell(note)} |")
    out = [("Scores", "\n".join(scores) + "\n"), ("Paired comparisons (per document)", "\n".join(paired) + "\n")]
    chance = [r for r in rows if r.metric == "acc_above_chance_p"]
    if chance:
        lines = ["| subject | task | correct / docs | p (one-sided binomial) |", "|---|---|---|---|"]
        lines += [f"| {_cell(r.subject)} | {_cell(r.case['task'])} | {r.extra.get('correct')}/{r.extra.get('docs')} "
                  f"| {_cell(r.value)} |" for r in chance]
        out.append(("Above chance", "\n".join(lines) + "\n"))
    return out

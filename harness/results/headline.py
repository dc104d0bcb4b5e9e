"""What every view of a run says first, as plain text: the untested-release banner, where a failing
run diverged, its findings, the counts and the verdict.

The console, report.md, the HTML page, JUnit and the pytest plugin all say these things; they say
them in the words written here, and each escapes them for its own format. Everything is read from a
summary (summary.json as `harness.results.stored` loads it), defensively: an older summary without
a field simply has nothing to say about it.
"""
from __future__ import annotations

from typing import Any

GATED = ("pass", "fail")
PER_INPUT = ("input", "shape", "device", "window")   # case keys that vary within one cell group


def banner(summary: dict) -> str:
    """The warning for a run under a transformers release the harness was not tested on, or ''."""
    env = summary.get("environment")
    if not isinstance(env, dict) or env.get("transformers_tested") is not False:
        return ""                   # tested, or a summary from before the harness recorded it
    tested = env.get("tested_releases") or "not recorded"
    return (f"transformers {env.get('transformers', '?')} is not a release this harness was tested on "
            f"(tested: {tested})")


def upgrade(summary: dict) -> list[str]:
    """A comparison's two sides (`compare`): what changed between the environments, then any
    WARNING that the sides differ in model, inputs or policy; [] for a suite's own run."""
    lines = []
    if isinstance(summary.get("upgrade"), str) and summary["upgrade"]:
        lines.append(f"baseline -> current: {summary['upgrade']}")
    warnings = summary.get("warnings")
    if isinstance(warnings, list):
        lines += [w for w in warnings if isinstance(w, str)]
    return lines


def banners(summaries: list[dict]) -> list[str]:
    return list(dict.fromkeys(b for b in map(banner, summaries) if b))


# --- where a failing run diverged ------------------------------------------------------------------

def divergences(summary: dict) -> list[dict]:
    """Where each failing cell group first diverges (the logits suite's ``divergences``, or the one
    ``first_divergence`` of a localisation), each with the ``case`` it was found on."""
    found = summary.get("divergences")
    if isinstance(found, list) and found:
        return [d for d in found if isinstance(d, dict)]
    first = summary.get("first_divergence")
    if not isinstance(first, dict):
        return []
    if not isinstance(first.get("case"), dict) and isinstance(summary.get("case"), dict):
        first = {**first, "case": summary["case"]}     # `localise` keeps the case beside it
    return [first]


def _settings(case: Any, skip: tuple[str, ...] = ("device",)) -> str:
    if not isinstance(case, dict):
        return ""
    return " ".join(f"{k}={v}" for k, v in case.items() if k not in skip)


def divergence_point(d: dict) -> str:
    """'layers.0.q', a mechanism ('attention_mask'), or why no point was named."""
    if d.get("error"):
        return f"not localised: {d['error']}"
    point, layer, op = d.get("point"), d.get("layer"), d.get("op")
    if point is None and layer is None and op is None:
        return "no point stands out of the reference's own error"
    if point:
        return str(point)
    return ", ".join(x for x in (f"layer {layer}" if layer is not None else "",
                                 f"op {op}" if op is not None else "") if x)


def divergence_detail(d: dict) -> str:
    """The numbers behind the point: its error over the reference's, where it was localised."""
    parts = []
    ratio = d.get("ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        parts.append(f"{ratio:.3g}x the reference's error")
    case = d.get("case") if isinstance(d.get("case"), dict) else {}
    if d.get("located_at") and d.get("located_at") != case.get("dtype"):
        parts.append(f"localised at {d['located_at']}")
    if d.get("certain") is False:
        parts.append("uncertain")
    if ratio is None and d.get("rule") and not d.get("error"):
        parts.append(str(d["rule"])[:240])      # a mechanism (mask, cache): the rule is the evidence
    return "; ".join(parts)


def divergence_line(d: dict) -> str:
    """One line: the group's settings, then where it diverges first and by how much."""
    where = _settings(d.get("case"))
    detail = divergence_detail(d)
    return f"{where + ': ' if where else ''}{divergence_point(d)}{f' ({detail})' if detail else ''}"


def cell_divergence(cell: dict, summary: dict) -> dict | None:
    """The divergence found for this failing cell's group: the entry whose case agrees with the
    cell on every setting both have, inputs aside (one entry per dtype x attn x tp group)."""
    if cell.get("status") != "fail":
        return None
    for d in divergences(summary):
        case = d.get("case")
        if not isinstance(case, dict):
            continue
        shared = [k for k in case if k in cell["case"] and k not in PER_INPUT]
        subject = d.get("subject")      # not recorded today: every localised group is a subject under test
        same = cell.get("subject") == subject if subject else cell.get("subject") != "reference"
        if same and shared and all(str(cell["case"][k]) == str(case[k]) for k in shared):
            return d
    return None


# --- findings -------------------------------------------------------------------------------------

def findings(summary: dict) -> list[dict]:
    """The summary's findings (harness.core.findings), new ones first as the run wrote them."""
    found = summary.get("findings")
    return [f for f in found if isinstance(f, dict)] if isinstance(found, list) else []


def finding_line(f: dict) -> str:
    """One finding in one line: new or known, whether it fails the run, how many cells, the title."""
    status = "NEW" if f.get("status") == "new" else (
        f"known, accepted by your {f['accepted_by']}" if f.get("accepted_by") else "known")
    gate = "fails the run" if f.get("gated") else "not gated"
    n = f.get("cells")
    where = f"; releases {f['releases']}" if f.get("releases") else ""
    return (f"[{status}, {gate}] {f.get('id')}: {f.get('title')} "
            f"({n} cell{'' if n == 1 else 's'}{where})")


def finding_detail(f: dict) -> str:
    """What differs and how to reproduce it, for a failure message."""
    parts = [f"differs: {f['differs']}" if f.get("differs") else "",
             f"reproduce: {f['reproduction']}" if f.get("reproduction") else "",
             f"source: {f['source']}" if f.get("source") else "",
             f"seen on transformers {f['seen_on']}" if f.get("seen_on") else "",
             f"e.g. {f['examples'][0]}" if isinstance(f.get("examples"), list) and f["examples"] else ""]
    return "; ".join(p for p in parts if p)


def cell_finding(cell: dict, summary: dict) -> dict | None:
    """The finding that explains this cell (``extra.finding_id``, written by the run), if any."""
    fid = (cell.get("extra") or {}).get("finding_id")
    if not isinstance(fid, str):
        return None
    return next((f for f in findings(summary) if f.get("id") == fid), None)


# --- counts and the verdict -----------------------------------------------------------------------

def counts(summaries: list[dict]) -> dict[str, int]:
    """Rows by status over every summary: passed and failed are the gated cells, skipped the n/a ones
    (not run: a setting the machine or the model does not have), info measured but not gated."""
    out = {"pass": 0, "fail": 0, "n/a": 0, "info": 0}
    for s in summaries:
        for c in s["cells"]:
            out[c["status"]] = out.get(c["status"], 0) + 1
    return out


def counts_line(summaries: list[dict]) -> str:
    """pytest's closing line: '10 passed, 8 failed, 0 skipped' (info rows said apart: not tests)."""
    n = counts(summaries)
    return (f"{n['pass']} passed, {n['fail']} failed, {n['n/a']} skipped"
            + (f"; {n['info']} info (measured, not gated)" if n["info"] else ""))


def verdict_line(summaries: list[dict]) -> str:
    """'verdict: FAIL: 8 cells fail their tolerance; 2 findings, 1 new' in plain words."""
    n = counts(summaries)
    found = [f for s in summaries for f in findings(s)]
    new = sum(f.get("status") == "new" for f in found)
    gated = sum(bool(f.get("gated")) for f in found)
    failing = n["fail"] > 0
    one = n["fail"] == 1
    parts = [f"{n['fail']} {'cell fails its' if one else 'cells fail their'} tolerance" if failing
             else "every gated cell passes its tolerance"]
    if found:
        parts.append(f"{len(found)} finding{'' if len(found) == 1 else 's'} ({new} new, {len(found) - new} known; "
                     f"{gated} fail{'s' if gated == 1 else ''} the run)")
    return f"verdict: {'FAIL' if failing else 'PASS'}: " + "; ".join(parts)


def na_reasons(summary: dict) -> list[tuple[str, int]]:
    """n/a rows grouped by reason, commonest first: one line says why 30 rows were not run."""
    by: dict[str, int] = {}
    for c in summary["cells"]:
        if c["status"] == "n/a":
            reason = str(c.get("reason") or "not applicable")
            by[reason] = by.get(reason, 0) + 1
    return sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))

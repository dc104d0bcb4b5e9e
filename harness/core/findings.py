"""Findings: the failing (and known) cells of a run, grouped by the mechanism that explains them.

Rows say what was measured, cell by cell; a finding says *why* a group of them differs, once. A
gate a CI user keeps switched on must say "3 findings, 1 new" rather than "1398 failing cells":

    {"id": "tokenizer/vocab-file-swallowed",      # <suite>/<mechanism key>, stable across runs
     "title": "LlamaTokenizer(vocab_file=...) ...", # one line a maintainer could act on
     "status": "new" | "known",                   # known: a cited deviation (harness.core.deviations)
     "gated": true,                               # counts against the verdict (new, or known under --strict)
     "cells": 123,                                # the cells it explains
     "subjects": ["transformers.LlamaTokenizer/vocab_file"],
     "settings": {"dtype": "float16"},            # case settings every one of its cells shares
     "releases": ">=5.0",                         # where it is known (PEP 440), or "" when not stated
     "seen_on": "5.25.0",                         # the transformers release of this run
     "reproduction": "LlamaTokenizer(vocab_file=p).encode('Hello world') -> []",
     "differs": "expected [15043, 3186], got []",  # the first cell's evidence, or its reason
     "source": "https://github.com/...",          # where a known deviation is documented
     "accepted_by": "ci/known.toml",              # known from the user's --known file, not the project's
     "examples": ["<cell id>", ...]}              # up to three cells, to find them in results.csv

How a row finds its finding, first match wins:
  1. ``row.extra["finding"]``: a mechanism key a suite's classifier set, described by the suite's
     ``Mechanism`` table (``Part.mechanisms``);
  2. ``row.extra["known"]``: set by ``deviations.settle`` when a cited deviation explains the row;
  3. otherwise the row is unexplained, grouped by subject and metric: a new finding whose title says
     that no mechanism was identified (a suite should learn to name it).
Only failing rows and rows a known deviation excused are findings; passing rows never are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from harness.core.store import FAIL, INFO, Row

MAX_EXAMPLES = 3


@dataclass(frozen=True)
class Mechanism:
    """What a suite knows about one cause of failing cells."""
    key: str
    title: str
    reproduction: str = ""
    source: str = ""
    releases: str = ""
    known: bool = False      # a deliberate, cited upstream difference (reported, not gated)
    origin: str = ""         # known from the user's --known file (its path), not the project's catalogue


def _subject(row: Row) -> str:
    parts = [row.subject] + [str(row.case[k]) for k in ("loader", "flags") if row.case.get(k)]
    return "/".join(parts)


def _differs(row: Row) -> str:
    ev = (row.extra.get("divergences") or [None])[0]
    if isinstance(ev, dict) and "expected" in ev:
        text = f"text {ev['text']!r}: " if "text" in ev else ""
        return f"{text}expected {ev['expected']!r}, got {ev.get('got')!r}"[:400]
    return row.reason[:400]


def key(row: Row, mechanisms: dict[str, Mechanism]) -> tuple[str, Mechanism]:
    """The finding a failing (or known-excused) row belongs to: its key and what is known of it."""
    key = row.extra.get("finding")
    if isinstance(key, str) and key in mechanisms:
        return key, mechanisms[key]
    known = row.extra.get("known")
    if isinstance(known, dict) and known.get("name"):
        # deviations that share a mechanism (one cause, several catalogue entries) are one finding
        title = str(known.get("mechanism") or known["name"])
        key = "known-" + "-".join(re.findall(r"[a-z0-9_=]+", title.lower()))[:80]
        return key, Mechanism(key, title, reproduction=str(known.get("reproduction") or ""),
                              source=str(known.get("source") or ""), releases=str(known.get("releases") or ""),
                              known=True, origin=str(known.get("origin") or ""))
    key = f"unexplained-{row.subject}-{row.metric}"
    return key, Mechanism(key, f"{row.subject} {row.metric}: cells beyond the tolerance, no mechanism "
                               "identified yet")


def collect(rows: list[Row], mechanisms: dict[str, Mechanism] | None = None, suite: str = "",
            release: str | None = None) -> list[dict[str, Any]]:
    """The findings of one suite's rows: new ones first, then by the number of cells they explain."""
    mechanisms = mechanisms or {}
    groups: dict[str, tuple[Mechanism, list[Row]]] = {}
    for r in rows:
        if r.status != FAIL and not (r.status == INFO and isinstance(r.extra.get("known"), dict)):
            continue
        k, mech = key(r, mechanisms)
        groups.setdefault(k, (mech, []))[1].append(r)
    out = []
    for k, (mech, members) in groups.items():
        gated = any(r.status == FAIL for r in members)
        shared = dict(members[0].case)
        for r in members[1:]:
            shared = {k: v for k, v in shared.items() if r.case.get(k) == v}
        out.append({
            "id": f"{suite or members[0].suite}/{k}",
            "title": mech.title,
            "status": "known" if mech.known else "new",
            "gated": gated,
            "cells": len(members),
            "subjects": sorted({_subject(r) for r in members}),
            "settings": shared,
            "releases": mech.releases,
            "seen_on": release or "",
            "reproduction": mech.reproduction,
            "differs": _differs(members[0]),
            "source": mech.source,
            "accepted_by": mech.origin,
            "examples": [r.cell_id() for r in members[:MAX_EXAMPLES]],
        })
    out.sort(key=lambda f: (f["status"] != "new", not f["gated"], -f["cells"], f["id"]))
    return out


def counts(findings: list[dict[str, Any]]) -> dict[str, int]:
    return {"new": sum(f["status"] == "new" for f in findings),
            "known": sum(f["status"] == "known" for f in findings),
            "gated": sum(bool(f["gated"]) for f in findings)}


_key = key   # the name callers used before it was public

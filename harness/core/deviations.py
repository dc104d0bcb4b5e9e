"""Known deviations: divergences that are understood and cited, in one format for every suite.

A known deviation turns a failing row into an ``info`` row (still measured and shown, not gated)
only when all of this holds, so that it can never hide a different or a worse bug:

    [known.NAME]
    where     = { cast = "to", metric = "kl_*" }    # row fields (case keys, subject, against,
                                                    # metric): fnmatch patterns, '|' between choices
    releases  = ">=4.38"                            # transformers releases it is known in (PEP 440)
    mechanism = "model.to(dtype) lowers inv_freq"   # the cause, in a line
    evidence  = { rope_buffers = "*inv_freq=bfloat16*" }   # the mechanism's fingerprint in the row's
                                                    # evidence (row.extra): fnmatch patterns
    max_ratio = 30                                  # value/tolerance past this is worse than the
                                                    # mechanism explains: the row still fails
    reason    = "what it is, where it was measured, what to do"
    source    = "https://github.com/huggingface/transformers/pull/..."   # where it is documented

``where`` and ``reason`` are required; the rest narrow. A row that a deviation's ``where`` and
``releases`` match but whose evidence or size does not fit keeps failing, and its reason says why
the deviation did not apply. ``--strict`` gates every row. Either way an explained row carries
``extra["known"]`` (name, mechanism, releases, source), which harness.core.findings groups by.

A user's own accepted findings come in the same schema from ``--known FILE`` (``read_user``): there
``releases`` and ``source`` are required too (an acceptance is of what the user checked, where they
checked it); the entries are merged with the project's, and every row they excuse carries the file
as ``extra["known"]["origin"]`` (findings' ``accepted_by``).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from harness.core.errors import InputError
from harness.core.store import FAIL, INFO, Row


def _matches(value: Any, pattern: Any) -> bool:
    text = str(value)
    return any(fnmatch.fnmatchcase(text, p) for p in str(pattern).split("|"))


@dataclass(frozen=True)
class Deviation:
    name: str
    where: dict[str, str]
    reason: str
    mechanism: str = ""
    releases: str = ""
    evidence: dict[str, str] = field(default_factory=dict)
    max_ratio: float | None = None
    source: str = ""
    origin: str = ""        # "": the project's catalogue; else the user's --known file it came from

    def known(self) -> dict[str, str]:
        """What an excused row carries as ``extra["known"]`` (harness.core.findings groups by it)."""
        out = {"name": self.name, "mechanism": self.mechanism or self.reason, "releases": self.releases,
               "source": self.source}
        if self.origin:
            out["origin"] = self.origin
        return out

    def applies_to(self, row: Row, release: str | None) -> bool:
        fields = {**row.case, "subject": row.subject, "against": row.against, "metric": row.metric}
        if not all(k in fields and _matches(fields[k], v) for k, v in self.where.items()):
            return False
        if self.releases and release:
            from packaging.specifiers import SpecifierSet
            from packaging.version import Version
            return Version(release) in SpecifierSet(self.releases)
        return True

    def misfit(self, row: Row) -> str:
        """'' when the row shows this deviation's mechanism within its size; else why not."""
        for k, pattern in self.evidence.items():
            got = row.extra.get(k)
            if got is None or not _matches(got, pattern):
                return f"evidence {k}={got!r} is not {pattern!r}"
        if self.max_ratio is not None:
            ratio = _ratio(row)
            if ratio is None or not ratio <= self.max_ratio:
                shown = "unknown" if ratio is None else f"{ratio:.3g}x"
                return f"value/tolerance {shown} > the {self.max_ratio:g}x it explains"
        return ""


def _ratio(row: Row) -> float | None:
    if row.value is None or row.tolerance is None or not math.isfinite(row.value):
        return None
    return row.value / row.tolerance if row.tolerance > 0 else (0.0 if row.value == 0 else math.inf)


def read(data: dict, where: str, origin: str = "", required: tuple[str, ...] = ()) -> list[Deviation]:
    """[known.NAME] tables of a suite's data file (``required``: string keys that must be non-empty;
    ``origin``: recorded on each deviation, the user's file for --known)."""
    out = []
    table = data.get("known") or {}
    if not isinstance(table, dict):
        raise InputError(f"{where}: [known] must be a table of [known.NAME] tables")
    allowed = {"where", "releases", "mechanism", "evidence", "max_ratio", "reason", "source"}
    for name, spec in table.items():
        at = f"{where}: [known.{name}]"
        if not isinstance(spec, dict):
            raise InputError(f"{at}: must be a table")
        extra = sorted(set(spec) - allowed)
        if extra:
            raise InputError(f"{at}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(allowed))})")
        if not (isinstance(spec.get("where"), dict) and spec["where"] and isinstance(spec.get("reason"), str)):
            raise InputError(f"{at}: needs a non-empty table 'where' and a string 'reason'")
        for k in required:
            if not (isinstance(spec.get(k), str) and spec[k].strip()):
                raise InputError(f"{at}: needs a non-empty string '{k}'")
        for k in ("mechanism", "source"):
            if k in spec and not isinstance(spec[k], str):
                raise InputError(f"{at}: {k} must be a string")
        releases = spec.get("releases", "")
        if releases:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet
            try:
                SpecifierSet(str(releases))
            except InvalidSpecifier:
                raise InputError(f"{at}: releases {releases!r} is not a version specifier (e.g. '>=4.38,<5')") from None
        max_ratio = spec.get("max_ratio")
        if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
                                      or not math.isfinite(max_ratio) or max_ratio <= 0):
            raise InputError(f"{at}: max_ratio must be a positive finite number")
        evidence = spec.get("evidence", {})
        if not isinstance(evidence, dict):
            raise InputError(f"{at}: evidence must be a table")
        out.append(Deviation(name, {k: str(v) for k, v in spec["where"].items()}, spec["reason"],
                             str(spec.get("mechanism", "")), str(releases),
                             {k: str(v) for k, v in evidence.items()},
                             None if max_ratio is None else float(max_ratio), str(spec.get("source", "")),
                             origin))
    return out


USER_REQUIRED = ("reason", "source", "releases")


def read_user(path: Any) -> list[Deviation]:
    """--known FILE: the user's own accepted findings, [known.NAME] tables in the catalogue's schema
    with reason, source and releases required. Anything malformed is exit 2 naming the file and key."""
    from pathlib import Path

    from harness.core.datafiles import parse_toml
    path = Path(path)
    data = parse_toml(path, "--known")
    extra = sorted(set(data) - {"known", "version"})
    if extra:
        raise InputError(f"--known {path}: unknown top-level key(s) {', '.join(extra)} (only [known.NAME] tables)")
    if not isinstance(data.get("known"), dict) or not data["known"]:
        raise InputError(f"--known {path}: no [known.NAME] table")
    return read(data, f"--known {path}", origin=str(path), required=USER_REQUIRED)


def merge(project: list[Deviation], user: list[Deviation]) -> list[Deviation]:
    """The project's deviations, then the user's; a user entry may not reuse a project name (which
    one excused a row must stay unambiguous)."""
    names = {d.name for d in project}
    for d in user:
        if d.name in names:
            raise InputError(f"--known {d.origin}: [known.{d.name}]: the project's catalogue already has an entry "
                             "of that name; rename yours")
    return list(project) + list(user)


def add_argument(p: Any) -> None:
    """--known FILE, for every suite that settles rows against known deviations."""
    p.add_argument("--known", metavar="FILE",
                   help="your own accepted findings: a TOML of [known.NAME] tables (the catalogue's schema; "
                        "where, releases, reason and source required), merged with the project's; rows they "
                        "excuse are listed as known, from your file (default: none)")


def user_deviations(a: Any) -> list[Deviation]:
    value = getattr(a, "known", None)
    return [] if value is None else read_user(value)


def user_summary(devs: list[Deviation], used: set[str] | None = None) -> dict[str, Any]:
    """For a summary's policy block: which known entries came from the user's --known file, and
    (given the names that excused a row) which of them excused nothing: a stale acceptance or a
    ``where`` that matches no cell should be seen, not trusted."""
    users = [d for d in devs if d.origin]
    if not users:
        return {}
    out: dict[str, Any] = {"file": users[0].origin, "entries": [d.name for d in users]}
    if used is not None:
        out["unused"] = [d.name for d in users if d.name not in used]
    return {"user_known": out}


def unused_note(summary: dict[str, Any]) -> list[str]:
    """A note for stderr when entries of the user's --known file excused no cell of this run."""
    uk = summary.get("user_known") or {}
    if not uk.get("unused"):
        return []
    return [f"note: --known {uk['file']}: {len(uk['unused'])} entr{'y' if len(uk['unused']) == 1 else 'ies'} "
            f"excused no cell of this run: {', '.join(uk['unused'])}"]


def settle(rows: list[Row], deviations: list[Deviation], strict: bool = False,
           release: str | None = None, subjects: tuple[str, ...] | None = None) -> list[Row]:
    """Failing rows that a known deviation explains become info rows naming it (under ``strict``
    they keep failing); either way they carry ``extra["known"]``. ``subjects``: the subjects a
    deviation may excuse (None: any)."""
    if not deviations:
        return rows
    if release is None:
        try:
            from harness.core.compat import transformers_release
            release = transformers_release()
        except ImportError:
            release = None
    for r in rows:
        if r.status != FAIL or (subjects is not None and r.subject not in subjects):
            continue
        misfits = []
        for d in deviations:
            if not d.applies_to(r, release):
                continue
            why = d.misfit(r)
            if not why:
                r.extra["known"] = d.known()
                if strict:
                    r.reason = f"{r.reason} (known deviation {d.name}, gated by --strict)"
                else:
                    r.status, r.reason = INFO, f"known deviation {d.name} (would fail: {r.reason}): {d.reason}"
                break
            misfits.append(f"not known deviation {d.name}: {why}")
        if r.status == FAIL and misfits and "known" not in r.extra:
            r.reason = f"{r.reason} ({'; '.join(misfits)})"
    return rows

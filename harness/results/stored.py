"""Reading stored results back (summary.json), for `report`, `compare`, the HTML page and JUnit.

Stored files may come from another machine or have been edited: every field a renderer uses is
checked for its type here, so that a tampered summary is exit 2 naming the file and field, never a
traceback halfway through a page.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import InputError
from harness.core.inputs import read_json

CELL_KEYS = {"case": dict, "subject": str, "against": str, "metric": str, "status": str}
STATUSES = ("pass", "fail", "n/a", "info")


def load_summary(path: Path) -> dict:
    """summary.json of one results folder (or the file itself), checked enough to render."""
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"--results: {path}: no summary.json there")
    summary = _clean(read_json("--results", file))
    if not isinstance(summary, dict):
        raise InputError(f"{file}: not a llama-parity summary (expected a JSON object)")
    for key, kind in (("suite", str), ("verdict", str), ("counts", dict), ("environment", dict), ("cells", list)):
        if key not in summary:
            raise InputError(f"{file}: missing key {key!r} (not a llama-parity summary)")
        if not isinstance(summary[key], kind):
            raise InputError(f"{file}: {key!r} must be a {kind.__name__}")
    if summary["verdict"] not in ("pass", "fail"):
        raise InputError(f"{file}: verdict {summary['verdict']!r} is not pass or fail")
    for k, v in summary["counts"].items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"{file}: counts[{k!r}] = {v!r} is not a count")
    for i, c in enumerate(summary["cells"]):
        if not isinstance(c, dict):
            raise InputError(f"{file}: cells[{i}] is not an object")
        missing = [k for k in (*CELL_KEYS, "value", "tolerance") if k not in c]
        if missing:
            raise InputError(f"{file}: cells[{i}] lacks {', '.join(missing)}")
        for k, kind in CELL_KEYS.items():
            if not isinstance(c[k], kind):
                raise InputError(f"{file}: cells[{i}].{k} must be a {kind.__name__}")
        c.setdefault("suite", summary["suite"])     # a row's suite is its summary's unless it says otherwise
        if not isinstance(c["suite"], str):
            raise InputError(f"{file}: cells[{i}].suite must be a str")
        if c["status"] not in STATUSES:
            raise InputError(f"{file}: cells[{i}].status {_shown(c['status'])} is not one of {', '.join(STATUSES)}")
        for k in ("value", "tolerance"):
            if not _number_like(c[k]):
                raise InputError(f"{file}: cells[{i}].{k} = {_shown(c[k])} is not a number")
        if c.get("reason") is not None and not isinstance(c["reason"], str):
            raise InputError(f"{file}: cells[{i}].reason must be a str")
        if "extra" in c and not isinstance(c["extra"], dict):
            raise InputError(f"{file}: cells[{i}].extra must be an object")
        for k, v in c["case"].items():
            if isinstance(v, (dict, list)):
                raise InputError(f"{file}: cells[{i}].case[{_shown(k)}] must be a plain value")
    _check_findings(file, summary)
    # The verdict is what `report` and `matrix` gate on: it must be the one its cells give.
    failing = sum(c["status"] == "fail" for c in summary["cells"])
    if summary["verdict"] != ("fail" if failing else "pass"):
        raise InputError(f"{file}: verdict {summary['verdict']!r}, but {failing} of its cells fail "
                         "(not the summary a run wrote)")
    for status in STATUSES:
        n = sum(c["status"] == status for c in summary["cells"])
        if status in summary["counts"] and summary["counts"][status] != n:
            raise InputError(f"{file}: counts[{status!r}] = {summary['counts'][status]}, but {n} cells are {status!r}")
    return summary


FINDING_KEYS = {"id": str, "title": str, "status": str, "gated": bool, "cells": int}   # harness.core.findings
FINDING_TEXT = ("releases", "seen_on", "reproduction", "differs", "source", "accepted_by")


def _check_findings(file: Path, summary: dict) -> None:
    """``findings`` (absent from summaries before it existed) as harness.core.findings writes it."""
    if "findings" not in summary:
        return
    found = summary["findings"]
    if not isinstance(found, list):
        raise InputError(f"{file}: 'findings' must be a list")
    for i, f in enumerate(found):
        where = f"{file}: findings[{i}]"
        if not isinstance(f, dict):
            raise InputError(f"{where} is not an object")
        missing = [k for k in FINDING_KEYS if k not in f]
        if missing:
            raise InputError(f"{where} lacks {', '.join(missing)}")
        for k, kind in FINDING_KEYS.items():
            if not isinstance(f[k], kind) or (kind is int and isinstance(f[k], bool)):
                raise InputError(f"{where}.{k} must be a {kind.__name__}")
        if f["status"] not in ("new", "known"):
            raise InputError(f"{where}.status {_shown(f['status'])} is not new or known")
        if f["cells"] < 0:
            raise InputError(f"{where}.cells = {f['cells']} is not a count")
        for k in FINDING_TEXT:
            if f.get(k) is not None and not isinstance(f[k], str):
                raise InputError(f"{where}.{k} must be a str")
        for k in ("subjects", "examples"):
            if k in f and not (isinstance(f[k], list) and all(isinstance(x, str) for x in f[k])):
                raise InputError(f"{where}.{k} must be a list of str")
        if "settings" in f and not (isinstance(f["settings"], dict) and
                                    not any(isinstance(v, (dict, list)) for v in f["settings"].values())):
            raise InputError(f"{where}.settings must be an object of plain values")


def _shown(x: Any, n: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(x: Any) -> Any:
    """Lone surrogates (valid in JSON, not encodable in UTF-8) become U+FFFD, everywhere."""
    if isinstance(x, str):
        return _SURROGATE.sub("\ufffd", x)
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {_clean(k): _clean(v) for k, v in x.items()}
    return x


def _number_like(x: Any) -> bool:
    if x is None or isinstance(x, float):
        return True
    if isinstance(x, int) and not isinstance(x, bool):
        return abs(x) <= sys.float_info.max      # an integer beyond float range breaks every ratio
    return isinstance(x, str) and x in ("nan", "inf", "-inf")


def find_results(paths: list[Path]) -> list[Path]:
    """Results folders under each path: the path itself when it holds summary.json, else its children."""
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
    """The tolerance policy version a summary was judged with."""
    pol = summary.get("policy")
    if isinstance(pol, dict) and pol.get("version"):
        return str(pol["version"])
    return "unknown"


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
    return [(str(k), "" if v is None else str(v)) for k, v in items]

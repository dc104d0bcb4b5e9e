"""Results table and summary.json: the one schema every suite writes.

A row is one case x subject x metric. Its case settings live in a flat dict
(`case`) so that suites with different axes (dtype/attn for logits, loader/flags
for the tokenizer) share one table. Files are written to a temporary name and
renamed, so an interrupted run never leaves a half-written results file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

PASS, FAIL, NA, INFO = "pass", "fail", "n/a", "info"   # info: measured, not gated


@dataclass
class Row:
    suite: str
    case: dict[str, Any]          # the settings of the cell, e.g. {"dtype": "bfloat16", "attn": "sdpa"}
    subject: str                  # who is measured, e.g. "transformers" or "reference"
    against: str                  # what it is measured against, e.g. "oracle-fp64"
    metric: str
    value: float | None
    tolerance: float | None = None
    status: str = PASS            # pass | fail | n/a | info
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return None if self.status in (NA, INFO) else self.status == PASS

    def cell_id(self) -> str:
        settings = ",".join(f"{k}={v}" for k, v in self.case.items())
        return f"{self.suite}[{settings}] {self.subject} vs {self.against}: {self.metric}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "case": dict(self.case),
            "subject": self.subject,
            "against": self.against,
            "metric": self.metric,
            "value": _json_float(self.value),
            "tolerance": _json_float(self.tolerance),
            "passed": self.passed,
            "status": self.status,
            "reason": self.reason,
            **({"extra": self.extra} if self.extra else {}),
        }


def _json_float(x: float | None) -> float | str | None:
    """JSON has no NaN/Inf; spell them out rather than write invalid JSON."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_frame(rows: list[Row]) -> pd.DataFrame:
    case_keys: list[str] = []
    for r in rows:
        for k in r.case:
            if k not in case_keys:
                case_keys.append(k)
    records = []
    for r in rows:
        rec = {"suite": r.suite}
        rec.update({k: r.case.get(k, "") for k in case_keys})
        rec.update(subject=r.subject, against=r.against, metric=r.metric, value=r.value,
                   tolerance=r.tolerance, status=r.status, reason=r.reason)
        records.append(rec)
    return pd.DataFrame.from_records(records)


def verdict(rows: list[Row]) -> str:
    return FAIL if any(r.status == FAIL for r in rows) else PASS


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(out_dir: Path, suite: str, rows: list[Row], environment: dict[str, Any],
                  extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write results.csv and summary.json into out_dir; return the summary."""
    out_dir = Path(out_dir)
    frame = to_frame(rows)
    atomic_write_text(out_dir / "results.csv", frame.to_csv(index=False, float_format="%.9g"))
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, NA, INFO)}
    summary = {
        "suite": suite,
        "verdict": verdict(rows),
        "counts": counts,
        **(extra_summary or {}),
        "environment": environment,
        "cells": [r.to_dict() for r in rows],
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=False) + "\n")
    return summary


def exit_code(rows: list[Row]) -> int:
    return 1 if verdict(rows) == FAIL else 0

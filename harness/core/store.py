"""Results table and summary.json: the one schema every suite writes.

A row is one case x subject x metric. Its case settings live in a flat dict
(`case`) so that suites with different axes (dtype/attn for logits, loader/flags
for the tokenizer) share one table. Files are written to a temporary name, synced and
renamed, so an interrupted run never leaves a half-written results file.

A suite that runs for long journals its rows group by group (`Journal`, one JSON line per
finished group, appended and fsynced): a rerun with the same output folder reads the journal
back, skips the groups already done and rebuilds results.csv / summary.json from it.
Timings go to timing.json, never into summary.json, so that two runs with the same seed,
inputs and environment write byte-identical summaries.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
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


    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        """The inverse of to_dict (how the journal reads its rows back)."""
        return cls(d["suite"], dict(d["case"]), d["subject"], d["against"], d["metric"],
                   _float_from_json(d["value"]), _float_from_json(d["tolerance"]),
                   d["status"], d["reason"], dict(d.get("extra") or {}))


def _float_from_json(x: float | str | None) -> float | None:
    return None if x is None else float(x)   # float("nan"), float("inf") read _json_float's spelling


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


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in path survive a crash (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Every temporary file the harness makes beside its results starts with this, so that the debris of
# a write killed between its temporary file and the rename is found, and nothing else is touched.
TMP_PREFIX = ".llama-parity-tmp."


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; results and reports are for other readers too
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


RESULT_FILES = ("results.csv", "summary.json", "report.md", "timing.json")


def check_writable(out_dir: Path, names=RESULT_FILES) -> None:
    """Refuse (exit 2, before anything is written or removed) a results folder that is a file, or
    where a result file's name is taken by a folder: a write would fail half-way through."""
    from harness.core.errors import InputError
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out: {out_dir}: exists and is not a folder")
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"--out: {out_dir}: {probe} is a file, so the folder cannot be made")
    for name in names:
        p = out_dir / name
        if p.exists() and not p.is_file():
            raise InputError(f"--out: {p} is not a file (where this run writes its {name}); move it away")


def write_results(out_dir: Path, suite: str, rows: list[Row], environment: dict[str, Any],
                  extra_summary: dict[str, Any] | None = None,
                  timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write results.csv and summary.json (and timing.json when given) into out_dir; return the summary.

    Timings are kept out of summary.json: they differ on every run, and the summary must not.
    """
    out_dir = Path(out_dir)
    check_writable(out_dir)
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
    if timing is not None:
        atomic_write_text(out_dir / "timing.json", json.dumps(timing, indent=1) + "\n")
    return summary


def exit_code(rows: list[Row]) -> int:
    return 1 if verdict(rows) == FAIL else 0


# --- the journal: finished groups of rows, for resuming an interrupted run -------------------------

JOURNAL = "journal.jsonl"
JOURNAL_VERSION = 1


def fingerprint(obj: Any) -> str:
    """A stable key for JSON-able settings (sorted keys, so dict order never matters)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class Journal:
    """One JSON line per finished group of rows in ``out_dir/journal.jsonl``.

    A group's key is the fingerprint of everything that decides its rows (the run's settings,
    model fingerprint, seed, policy version, environment, plus the group's own settings), so a
    rerun reuses a group only when it would compute the same rows. Each line is written with one
    ``write`` on an O_APPEND descriptor and fsynced before the run goes on. A line cut short by a
    kill, or any line that does not parse, is dropped when the journal is opened (the folder is
    rewritten atomically without it), and its group simply runs again.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / JOURNAL
        self.entries: dict[str, list[Row]] = {}
        self.dropped = 0            # lines that did not parse (an interrupted append, or damage)
        self.reused: set[str] = set()

    @classmethod
    def open(cls, out_dir: Path) -> "Journal":
        j = cls(out_dir)
        j.path.parent.mkdir(parents=True, exist_ok=True)
        if not j.path.exists():
            return j
        if not j.path.is_file():
            from harness.core.errors import InputError
            raise InputError(f"--out: {j.path} is not a file (the journal a rerun resumes from); move it away")
        raw = j.path.read_bytes()
        good: list[bytes] = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            entry = _parse_entry(line)
            if entry is None:
                j.dropped += 1
                continue
            key, rows = entry
            j.entries[key] = rows
            good.append(line)
        if j.dropped or (raw and not raw.endswith(b"\n")):
            # Rewrite without the bad lines, or the next append would glue onto a partial one.
            atomic_write_text(j.path, "".join(line.decode("utf-8") + "\n" for line in good))
        return j

    def get(self, key: str) -> list[Row] | None:
        rows = self.entries.get(key)
        if rows is not None:
            self.reused.add(key)
        return rows

    def append(self, key: str, group: dict[str, Any], rows: list[Row]) -> None:
        line = json.dumps({"v": JOURNAL_VERSION, "key": key, "group": group,
                           "rows": [r.to_dict() for r in rows]}, default=str) + "\n"   # key order kept: it is the CSV's column order
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = line.encode("utf-8")
            written = os.write(fd, data)
            while written < len(data):   # os.write may write less on some filesystems
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        self.entries[key] = rows


def _parse_entry(line: bytes) -> tuple[str, list[Row]] | None:
    """A journal line's (key, rows), or None when it is not exactly what ``append`` writes: a line
    that is damaged or edited is dropped and its group runs again, never reused half-valid."""
    try:
        d = json.loads(line.decode("utf-8"))
        if not isinstance(d, dict) or d.get("v") != JOURNAL_VERSION or not isinstance(d.get("key"), str):
            return None
        rows = d.get("rows")
        if not isinstance(rows, list) or not rows or not all(_journal_row_ok(r) for r in rows):
            return None     # a finished group always has rows (n/a ones at least)
        return d["key"], [Row.from_dict(r) for r in rows]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
        return None


_PLAIN = (str, int, float, bool, type(None))


def _text_ok(x: Any) -> bool:
    """A str that can be written as UTF-8 (results.csv, report.md): no lone surrogates."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number_ok(x: Any) -> bool:
    if x is None or isinstance(x, float):
        return True
    if isinstance(x, int) and not isinstance(x, bool):
        return abs(x) <= 1.7976931348623157e308
    return x in ("nan", "inf", "-inf")


def _journal_row_ok(r: Any) -> bool:
    """One row as ``Row.to_dict`` writes it: its types, its status, its case of plain values."""
    if not isinstance(r, dict):
        return False
    if not all(_text_ok(r.get(k)) for k in ("suite", "subject", "against", "metric", "status", "reason")):
        return False
    if r["status"] not in (PASS, FAIL, NA, INFO):
        return False
    case = r.get("case")
    if not isinstance(case, dict) or not all(_text_ok(k) and isinstance(v, _PLAIN) and
                                             (not isinstance(v, str) or _text_ok(v)) for k, v in case.items()):
        return False
    if not (_number_ok(r.get("value")) and _number_ok(r.get("tolerance"))):
        return False
    return isinstance(r.get("extra", {}), dict) or r.get("extra") is None


def clear_results(out_dir: Path) -> None:
    """Remove a previous run's results before a new run starts, so that a run killed half-way
    leaves no verdict behind that is not its own (the journal stays: it is what resumes)."""
    check_writable(out_dir)          # every name first: a folder in the way must not cost the others
    for name in RESULT_FILES:
        p = Path(out_dir) / name
        if p.exists() or p.is_symlink():
            p.unlink()


# --- what else a run owns in its --out -----------------------------------------------------------

REPORT_DIR = "report"            # --html renders the run's results here
REPORT_FILES = ("index.html", "junit.xml", "report.md")   # report.md: written there by releases before 2026.12


def clear_derived(out_dir: Path) -> None:
    """Remove the views an earlier run rendered into OUT/report, so that no page or JUnit file there
    can contradict this run's summary.json (a run with --html writes them again; the folder goes
    when nothing of the user's is left in it)."""
    report = Path(out_dir) / REPORT_DIR
    if not report.is_dir() or report.is_symlink():
        return
    for name in REPORT_FILES:
        p = report / name
        if p.is_file() or p.is_symlink():
            p.unlink()
    clean_temporary(report)
    try:
        report.rmdir()
    except OSError:              # the user's own files are in it: they stay, and so does the folder
        pass


STASH_PREFIX = ".llama-parity-previous."


def stash_previous(out_dir: Path, journal: bool = False) -> Path | None:
    """Move the previous run's results (RESULT_FILES, OUT/report's views, and the journal when asked)
    into OUT/.llama-parity-previous.<pid>/ by rename; None when there was nothing to move. Stashes
    left by killed runs are removed first (the caller holds the folder's lock: none is in use)."""
    out_dir = Path(out_dir)
    for old in out_dir.glob(f"{STASH_PREFIX}*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    names = [*RESULT_FILES, *([JOURNAL] if journal else []), *(f"{REPORT_DIR}/{n}" for n in REPORT_FILES)]
    moving = [n for n in names if (out_dir / n).is_file() and not (out_dir / n).is_symlink()]
    if not moving:
        return None
    stash = out_dir / f"{STASH_PREFIX}{os.getpid()}"
    for name in moving:
        (stash / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out_dir / name, stash / name)
    _fsync_dir(out_dir)
    return stash


def restore_stash(stash: Path, out_dir: Path) -> None:
    """Undo stash_previous: every file back under its name (a run that refused after begin())."""
    for p in sorted(Path(stash).rglob("*")):
        if p.is_file():
            dst = Path(out_dir) / p.relative_to(stash)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dst)
    shutil.rmtree(stash, ignore_errors=True)
    _fsync_dir(Path(out_dir))


def clean_temporary(folder: Path) -> None:
    """Remove the harness's own temporary files (TMP_PREFIX) in a results folder and its sub-folders
    (a write killed between its temporary file and the rename leaves one); nobody else's. Releases
    before TMP_PREFIX named them '.<file>.<random>.tmp': those are recognised by the name of a file
    the harness writes (a user's '.notes.tmp' is not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    older = [f".{name}.*.tmp" for name in (*RESULT_FILES, JOURNAL, *REPORT_FILES)]
    for pattern in (f"{TMP_PREFIX}*", *older):
        for p in [*folder.glob(pattern), *folder.glob(f"*/{pattern}")]:
            if p.is_file() or p.is_symlink():
                p.unlink()


LOCK = ".llama-parity.lock"


class FolderLock:
    """One run at a time in a results folder: an exclusive ``flock`` on OUT/.llama-parity.lock.

    A second run is refused at once (exit 2 naming the holder) rather than made to wait: a run may
    last hours, and two jobs sharing one --out is a mistake to be told about, not queued behind. The
    kernel drops the lock when its process dies, so the file a killed run leaves never blocks the
    next one; a run that ends normally removes it.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str = "") -> bool:
        """Take the lock (the folder must exist); False where the filesystem has no locks."""
        from harness.core.errors import InputError
        try:
            import fcntl
        except ImportError:          # not a POSIX system: no lock, as before
            return False
        if self._fd is not None:
            return True
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except IsADirectoryError:
                raise InputError(f"--out: {self.path} is not a file (the lock that keeps two runs out of one "
                                 "folder); move it away") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise InputError(f"--out: {self.folder} is in use by another llama-parity run"
                                 f"{f' ({holder})' if holder else ''}; wait for it to end or choose another "
                                 "--out") from None
            except OSError:          # a filesystem without flock (some network mounts): run unlocked
                os.close(fd)
                return False
            # the run before us may have removed the file between our open and our lock: lock the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {stamp}: {command}".encode("utf-8", "replace")[:1000])
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)     # while still locked: nobody can be holding the file we remove
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_fd(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1000).decode("utf-8", "replace").strip()
    except OSError:
        return ""

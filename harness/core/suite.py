"""The one shape every command has, and what a suite hands back.

A suite declares its arguments and returns a ``Result``: rows plus summary extras, in one part
or several (``behaviour`` writes one folder per sub-suite). It never writes results and never
exits; ``harness.cli`` writes every part (results.csv, summary.json, report.md), prints the
console table and picks the exit code, in one place. A suite that journals its progress (a long
run that must survive a kill) does so through ``Context.journal``.

    class Suite(Command):
        name = "logits"                      # the subcommand; its data file is suites/<name>.toml
        help = "..."
        def add_arguments(self, p): ...
        def run(self, a, ctx) -> Result: ... # validate everything first, then ctx.begin(), then measure

Commands that are not suites (``report``, ``make-model``, ...) return an exit code instead.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.errors import InputError
from harness.core.store import (JOURNAL, FolderLock, Journal, Row, check_writable, clean_temporary, clear_derived,
                                clear_results, restore_stash, stash_previous)


@dataclass
class Part:
    """One results folder: the rows of one suite and what its summary says besides them."""
    suite: str
    rows: list[Row]
    extra: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None                 # a sub-folder of --out; None: --out itself
    sections: list[tuple[str, str]] = field(default_factory=list)   # report.md: (title, Markdown)
    files: dict[str, str] = field(default_factory=dict)             # more files beside the results
    timing: dict[str, Any] | None = None      # timing.json (never in summary.json)
    device: str = "cpu"
    calibrators: tuple[str, ...] = ("reference",)   # subjects that calibrate, not under test
    mechanisms: dict[str, Any] = field(default_factory=dict)   # key -> harness.core.findings.Mechanism

    def measured(self) -> bool:
        """Whether any subject under test was measured (a run of n/a rows has passed nothing)."""
        return any(r.status != "n/a" and r.subject not in self.calibrators for r in self.rows)


@dataclass
class Result:
    parts: list[Part]
    notes: list[str] = field(default_factory=list)   # said on stderr after the run


class Context:
    """What a running suite may touch: where results go, the journal, progress and notes."""

    def __init__(self, out: Path, progress: bool = True, memory_budget: int | None = None, command: str = ""):
        self.out = Path(out)
        self.progress = progress
        self.memory_budget = memory_budget      # bytes; None: what the device has (harness.core.resources)
        self.notes: list[str] = []
        self._journal: Journal | None = None
        self._lock = FolderLock(self.out)
        self._stash: Path | None = None         # the previous run's results, moved aside by begin()
        self.command = command                  # said to a second run that finds --out busy

    def lock(self, create: bool = True) -> None:
        """Hold --out for this run alone (harness.core.store.FolderLock): a second run into it is
        refused. ``create=False`` locks only a folder that exists already: nothing is made for a run
        that may still end in exit 2."""
        if self._lock.held:
            return
        if not self.out.is_dir():
            if not create:
                return
            self.out.mkdir(parents=True, exist_ok=True)
        if not self._lock.acquire(self.command):
            self._lock = _NoLock()
            self.note(f"note: {self.out} could not be locked (its filesystem has no file locks): a second run "
                      "into it at the same time would not be refused")

    def release(self) -> None:
        self._lock.release()

    def check_memory(self, needs: list, device: str) -> None:
        from harness.core.resources import check
        check(needs, device, self.memory_budget)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def begin(self, resume: bool = True) -> None:
        """Called once every input is validated: the run takes --out for itself (a second run is
        refused), and stale results and every view rendered from them (OUT/report) go, so that a run
        killed from here on leaves no verdict that is not its own (the journal stays unless resume
        is off). Only the harness's own temporary files are cleaned, never the user's."""
        journal = self.out / JOURNAL
        if journal.exists() and not journal.is_file():
            raise InputError(f"--out: {journal} is not a file (the journal a rerun resumes from); move it away")
        check_writable(self.out)        # every name before anything is made or removed
        self.lock()                     # before removing anything: another run's results are its own
        clean_temporary(self.out)       # a write killed between its temporary file and the rename
        # The previous run's results and views move aside, not away: a run that still ends in exit 2
        # (every cell n/a, a checkpoint refused mid-run) puts them back (restore_previous), one that
        # writes its own results drops them (discard_previous), and a killed run's are dropped by the
        # next run that holds the lock, so no verdict in --out is ever one this run did not reach.
        self._stash = stash_previous(self.out, journal=not resume)
        clear_results(self.out)         # what stash_previous could not move (none, normally)
        clear_derived(self.out)

    def restore_previous(self) -> None:
        """Put back what begin() moved aside: this run ends in exit 2 before writing anything."""
        if self._stash is not None:
            restore_stash(self._stash, self.out)
            self._stash = None

    def discard_previous(self) -> None:
        """This run's results are being written (or the run died): the previous ones go for good."""
        if self._stash is not None:
            shutil.rmtree(self._stash, ignore_errors=True)
            self._stash = None

    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal.open(self.out)
            if self._journal.dropped:
                self.note(f"note: {self._journal.dropped} unreadable line(s) in {self._journal.path} dropped; "
                          "their groups run again")
        return self._journal


class _NoLock:
    held = True          # asked once; a filesystem without locks is not asked again

    def release(self) -> None:
        pass


class Command:
    """A subcommand: its name, its arguments and what it does."""
    name = ""
    help = ""
    suite = False        # a suite returns a Result; a tool returns an exit code
    mkl_branch: str | None = None   # MKL's code branch the command pins (harness/core/mkl.py), if any

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, a: argparse.Namespace, ctx: Context) -> Result | int:
        raise NotImplementedError


class Suite(Command):
    suite = True


def say(message: str) -> None:
    print(message, file=sys.stderr)

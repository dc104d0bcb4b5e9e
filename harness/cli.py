"""`llama-parity`: the command line, and the only module that knows every command.

Each suite declares its arguments and returns a Result (harness.core.suite); ``finish`` writes
every part (results.csv, summary.json, report.md, timing.json), prints the console summary
(failing cells, first divergence, findings, then the verdict and pytest's "N passed, N failed,
N skipped" as the last line) and picks the exit code, for all of them alike. A run holds its
--out alone (a second run into it is refused) and leaves nothing there from an earlier run that
could contradict its summary.json. Exit codes, decided here and nowhere else:

  0  every gated cell passes
  1  a cell fails its tolerance (the failing cells are printed)
  2  bad input or usage: the message names the argument, file or key; nothing is written
  3  an error inside the harness itself: a bug to report, never a verdict on transformers
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback

from harness.core import inputs
from harness.core.errors import InputError
from harness.core.suite import Command, Context, Result, say
from reference_model.errors import CheckpointError


def commands() -> list[Command]:
    from harness.results.matrix import Matrix
    from harness.results.regression import Compare
    from harness.results.render import Report
    from harness.scale.localise import Localise
    from harness.scale.place import Place
    from harness.scale.stream import Stream
    from harness.suites.axes import Axes
    from harness.suites.behaviour import Behaviour
    from harness.suites.bench import Bench
    from harness.suites.logits import Logits
    from harness.suites.mp import MP
    from harness.suites.tokenizer import Tokenizer
    from harness.suites.train import Train
    from harness.tools import Convert, Fixtures, MakeModel
    return [Logits(), MakeModel(), Convert(), Tokenizer(), Fixtures(), Behaviour(), Axes(), Bench(), MP(), Matrix(),
            Localise(), Stream(), Place(), Report(), Compare(), Train()]


DESCRIPTION = """\
Numerical parity of Hugging Face transformers' Llama 2 against an independent float64 reference.

Each suite compares the subjects cell by cell and writes results.csv, summary.json and report.md
into --out (with --html also report/index.html and report/junit.xml). `llama-parity COMMAND --help`
lists a command's flags with their defaults."""

EXIT_CODES = """\
exit codes:
  0  every gated cell passes
  1  a cell fails its tolerance (the failing cells are printed)
  2  bad input or usage: the message names the argument, file or key; nothing is written
  3  an error inside the harness itself: a bug to report, never a verdict on transformers"""

TOOL_EXIT_CODES = """\
exit codes: 0 done, 2 bad input or usage (the message names the argument, file or key),
3 an error inside the harness itself"""

# One flag, two spellings: either is accepted wherever the other is declared, and both land in
# the dest of the one the command declared (a single dtype or a comma list, as its help says).
ALIASES = {"--dtypes": "--dtype", "--dtype": "--dtypes", "--tp": "--pretraining-tp"}

# The flags the CLI adds to suites are offered only where they change something: --no-progress to
# the suites that draw progress bars, --memory-budget to those that estimate the memory a run
# needs (Context.check_memory) and refuse one that would not fit. --out, --html and --verbose
# mean something for every suite (finish writes, renders and prints every Result alike).
PROGRESS_BARS = ("logits", "tokenizer", "bench")
MEMORY_CHECKED = ("logits", "behaviour", "axes", "bench", "mp", "localise", "stream", "place", "train")

# Help for flags that mean the same wherever a command declares them without help of its own.
SHARED_HELP = {
    "device": "cpu, cuda or cuda:N",
    "seed": "seed of the random inputs",
}
# Flags whose absence means "nothing of the kind" (their help lists what could be given instead).
NONE_BY_DEFAULT = ("plant",)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default shown once: appended as "(default: X)" unless its help already says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.required or action.nargs == 0 or default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if default is None:
            return f"{text} (default: none)" if action.dest in NONE_BY_DEFAULT else text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        """Lines break between words, never inside a name such as norm-low-precision."""
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse with the harness's one error format: exit 2, 'llama-parity: error:' and the argument."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"llama-parity: error: {self.prog}: {message}\n")

    def add_argument(self, *names, **kwargs):
        names += tuple(ALIASES[n] for n in names if n in ALIASES and ALIASES[n] not in names)
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """A flag the command does not take is refused by that command's parser: its usage, its name."""
        a, extra = self.parse_known_args(args, namespace)
        if extra:
            sub = self.commands.get(getattr(a, "command", None), self)
            sub.error(f"unrecognized arguments: {' '.join(extra)} (`{sub.prog} --help` lists its flags)")
        return a


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llama-parity", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    p.commands = sub.choices
    for cmd in commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                            epilog=EXIT_CODES if cmd.suite else TOOL_EXIT_CODES, formatter_class=HelpFormatter)
        cmd.add_arguments(sp)
        if cmd.suite:
            sp.add_argument("--out", default=f"reports/latest/{cmd.name}",
                            help="output folder (results.csv, summary.json, report.md)")
            sp.add_argument("--html", action="store_true",
                            help="also render the self-contained HTML report and JUnit XML into OUT/report "
                                 "(without it, a run removes the ones an earlier run left there)")
            if cmd.name in PROGRESS_BARS:
                sp.add_argument("--no-progress", action="store_true",
                                help="no progress bars (they are drawn only when stderr is a terminal)")
            sp.add_argument("--verbose", action="store_true",
                            help="print every cell, passing, n/a and info rows included (default: the failing "
                                 "cells, findings and n/a reasons, then the counts)")
            if cmd.name in MEMORY_CHECKED:
                sp.add_argument("--memory-budget", help="memory the run may use, e.g. 20GiB (default: what the "
                                                        "device has available); a run estimated to need more is "
                                                        "refused")
        for action in sp._actions:
            if not action.help and action.dest in SHARED_HELP:
                action.help = SHARED_HELP[action.dest]
        sp.set_defaults(cmd=cmd)
    return p


def finish(result: Result, ctx: Context, a: argparse.Namespace) -> int:
    """Write every part of a suite's result, show it, and say what the run means (0 or 1).

    What an earlier run rendered into OUT/report goes before anything is written, so that no file
    in --out can contradict this run's summary.json (--html renders it again)."""
    from harness.core.environment import environment
    from harness.core.findings import collect
    from harness.core.store import FAIL, atomic_write_text, check_writable, clear_derived, write_results
    from harness.results.markdown import print_console, print_totals, write_markdown
    if result.parts and not any(part.measured() for part in result.parts):
        reasons = sorted({r.reason for part in result.parts for r in part.rows if r.reason})[:3]
        raise InputError("nothing was measured: every cell of a subject under test is n/a or info"
                         + (f" ({'; '.join(reasons)})" if reasons else "")
                         + f"; choose settings this machine runs{_cell_arguments(a)}")
    for part in result.parts:           # every folder checked before the first one is written
        check_writable(ctx.out / part.folder if part.folder else ctx.out)
    ctx.lock()                          # suites that never called ctx.begin() take --out here
    ctx.discard_previous()              # from here this run's results replace the previous ones
    clear_derived(ctx.out)
    folders, summaries, failed = [], [], False
    for part in result.parts:
        out = ctx.out / part.folder if part.folder else ctx.out
        env = environment(part.device)
        _link_findings(part)
        extra = {**part.extra, "findings": collect(part.rows, part.mechanisms, part.suite, env.get("transformers"))}
        summary = write_results(out, part.suite, part.rows, env, extra, timing=part.timing)
        for name, text in part.files.items():
            atomic_write_text(out / name, text)
        write_markdown(out / "report.md", summary, part.sections)
        if len(result.parts) > 1 and summaries:
            print()
        name = part.suite if part.suite == a.command else f"{a.command}/{part.folder or part.suite}"
        print_console(summary, verbose=getattr(a, "verbose", False), name=name)
        folders.append(out)
        summaries.append(summary)
        failed = failed or any(r.status == FAIL for r in part.rows)
    for line in result.notes + [n for n in ctx.notes if n not in result.notes]:
        say(line)
    if getattr(a, "html", False):
        from harness.results.render import render_report
        render_report(folders, ctx.out / "report", echo=False, markdown=False)
    where = ", ".join(str(f) for f in folders)
    print(inputs.printable(f"\nresults: {where} (results.csv, summary.json, report.md"
                           f"{'; report/index.html, report/junit.xml' if a.html else ''})"))
    print_totals(summaries)
    return 1 if failed else 0


def _link_findings(part) -> None:
    """Each failing (or known-excused) row names the finding that explains it, ``extra["finding_id"]``,
    so that JUnit, the pytest plugin and the pages can say it beside the cell (the rule is the one
    ``harness.core.findings.collect`` groups by)."""
    from harness.core.findings import key
    from harness.core.store import FAIL, INFO
    for r in part.rows:
        if r.status == FAIL or (r.status == INFO and isinstance(r.extra.get("known"), dict)):
            r.extra["finding_id"] = f"{part.suite or r.suite}/{key(r, part.mechanisms)[0]}"


# the arguments that choose a suite's cells, named when none of the chosen cells can be measured
CELL_ARGUMENTS = ("dtypes", "dtype", "attn", "tp", "shapes", "shape", "degrees", "casts", "lengths", "suite",
                  "subjects", "device", "inputs")


def _cell_arguments(a: argparse.Namespace) -> str:
    given = [f"--{k} {v}" for k in CELL_ARGUMENTS if isinstance(v := getattr(a, k, None), str)]
    return f" (the cells were chosen by {', '.join(given)})" if given else ""


def execute(a: argparse.Namespace) -> int:
    if a.cmd.mkl_branch:                # before the command's first matrix multiply (MKL reads it once)
        from harness.core import mkl
        mkl.pin(a.cmd.mkl_branch)
    if not a.cmd.suite:
        return a.cmd.run(a, None)
    from harness.core.store import REPORT_DIR, check_writable
    given = getattr(a, "memory_budget", None)
    budget = inputs.size("--memory-budget", given) if given else None
    ctx = Context(inputs.out_dir(a.out), progress=not getattr(a, "no_progress", False) and _terminal(sys.stderr),
                  memory_budget=budget, command=f"llama-parity {a.command} --out {a.out}")
    if a.html:                          # refused before the run, not after its results are written
        inputs.out_dir(ctx.out / REPORT_DIR)
        check_writable(ctx.out / REPORT_DIR, ("index.html", "junit.xml"))
    try:
        ctx.lock(create=False)          # an --out that exists is held from the start: a second run is refused
        return finish(a.cmd.run(a, ctx), ctx, a)
    except (InputError, CheckpointError, MemoryError):
        ctx.restore_previous()          # exit 2 leaves --out as it found it
        raise
    finally:
        ctx.discard_previous()
        ctx.release()


def _terminal(stream) -> bool:
    """Progress bars only where a person watches: a CI log gets none."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _refuse_swallowed_values(argv: list[str]) -> None:
    """Python 3.11's argparse reads "--opt=--" as an empty list, which would reach the code as a value."""
    for arg in argv:
        if arg.startswith("--") and arg.endswith("=--"):
            raise InputError(f"{arg.split('=', 1)[0]}: '--' is not a value")


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            a = build_parser().parse_args(argv)
        except SystemExit as e:          # argparse: --help (0) or a usage error (2), already printed
            return e.code if isinstance(e.code, int) else 2
        _refuse_swallowed_values(argv if argv is not None else sys.argv[1:])
        return execute(a)
    except (InputError, CheckpointError) as e:
        say(f"llama-parity: error: {e}")
        return 2
    except MemoryError:
        say("llama-parity: error: out of memory (a smaller --shapes, fewer dtypes or a larger machine)")
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        say(f"llama-parity: error: {_variable_behind(e.filename)}{where}{e.strerror or e} (finished groups are journaled: "
            "the next run resumes)")
        return 2
    except KeyboardInterrupt as e:
        say(f"llama-parity: {'terminated' if isinstance(e, Terminated) else 'interrupted'} (finished groups are "
            "journaled: the next run resumes)")
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:   # noqa: BLE001 - a harness bug must never read as "transformers diverged" (1)
        say(f"llama-parity: internal error: {type(e).__name__}: {str(e)[:500]}")
        say("  this is a bug in the harness, not a verdict (exit 3); LLAMA_PARITY_DEBUG=1 shows the traceback")
        if os.environ.get("LLAMA_PARITY_DEBUG"):
            traceback.print_exc()
        return 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a CI timeout sends) raised as an exception, so that every ``finally`` and
    context manager runs: converted weights and temporary files are removed, the lock released."""


def _on_sigterm(signum, frame):
    raise Terminated()


# Variables that choose where the harness and the libraries it drives write: an OSError under one of
# them is a problem with the variable's value, and the message says which.
PATH_VARIABLES = ("LLAMA_PARITY_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE",
                  "TRANSFORMERS_CACHE", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "TMPDIR", "HOME")


def _variable_behind(filename) -> str:
    """'HF_HOME=/x: a file, not a folder; ' when the failing path lies under a variable's value."""
    if not filename:
        return ""
    from pathlib import Path
    failing = Path(os.fsdecode(filename))
    for var in PATH_VARIABLES:
        value = os.environ.get(var)
        if not value or not (failing == Path(value) or Path(value) in failing.parents):
            continue
        problem = inputs.path_problem(Path(value), "folder")
        return f"{var}={value}{f' is {problem}' if problem else ''}: "
    return ""


def main_entry() -> None:
    import signal
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())

"""pytest plugin: `pytest --llama-parity-model PATH` gives one test per parity cell.

Registered through the `pytest11` entry point (name `llama_parity`), so any project with
llama-parity installed can run its weights through the logits gate inside its own test run, and
use tox envs (one per transformers release) as the outer matrix. With
`--llama-parity-results DIR` it reads stored results instead of running models (a CI job that ran
the suite in an earlier step).

The suite runs once, at collection time, through the same `llama-parity logits` command line
(so its options, defaults and input errors are the CLI's). Each gated row of the summary becomes
one test item: pass passes, fail fails with value, tolerance and reason, where its group
diverged first and the finding that explains it (the JUnit failure text), n/a is skipped with its
reason; info rows (measured, not gated) are not tests.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest

OPTIONS = (   # (option, help); each maps to the `llama-parity logits` flag of the same name
    ("dtypes", "comma list of dtypes"),
    ("attn", "comma list of attention implementations"),
    ("tp", "comma list of pretraining_tp values"),
    ("shapes", "comma list of BATCHxSEQ"),
    ("device", "cpu, cuda or cuda:N"),
    ("seed", "input seed"),
    ("policy", "tolerance policy TOML"),
    ("plant", "plant a known porting bug (gate self-test)"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llama-parity", "llama-parity: one test per parity cell")
    group.addoption("--llama-parity-model", metavar="PATH",
                    help="Meta or HF Llama 2 folder: run the logits suite on it, one test per cell")
    group.addoption("--llama-parity-results", metavar="DIR",
                    help="stored results folder (summary.json): one test per cell, no model run")
    group.addoption("--llama-parity-out", metavar="DIR",
                    help="where the run writes its results (default: a temporary folder)")
    for name, help_text in OPTIONS:
        group.addoption(f"--llama-parity-{name}", metavar="VALUE", help=help_text)


def _run_suite(config: pytest.Config) -> Path:
    from harness.cli import main
    out = config.getoption("llama_parity_out") or tempfile.mkdtemp(prefix="llama-parity-")
    argv = ["logits", "--model", config.getoption("llama_parity_model"), "--out", str(out), "--no-progress"]
    for name, _ in OPTIONS:
        value = config.getoption(f"llama_parity_{name}")
        if value is not None:
            argv += [f"--{name}", str(value)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code == 2:
        raise pytest.UsageError(f"llama-parity logits: {err.getvalue().strip()}")
    return Path(out)


class ParityCell(pytest.Item):
    def __init__(self, *, cell: dict, summary: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell
        self.summary = summary

    def runtest(self) -> None:
        from harness.results.junit import failure_text
        status = self.cell["status"]
        if status == "n/a":
            pytest.skip(self.cell.get("reason") or "not applicable")
        if status == "fail":   # its numbers, where its group diverged first, the finding that explains it
            pytest.fail(failure_text(self.cell, self.summary), pytrace=False)

    def reportinfo(self):
        return "llama-parity", None, self.name


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    model, stored = config.getoption("llama_parity_model"), config.getoption("llama_parity_results")
    if not model and not stored:
        return
    if model and stored:
        raise pytest.UsageError("--llama-parity-model and --llama-parity-results: give one, not both")
    from harness.core.errors import InputError
    from harness.results.stored import load_summary
    try:
        summary = load_summary(_run_suite(config) if model else Path(stored))
    except InputError as e:
        raise pytest.UsageError(str(e)) from None
    seen: dict[str, int] = {}
    for cell in summary["cells"]:
        if cell["status"] not in ("pass", "fail", "n/a"):
            continue
        settings = ",".join(f"{k}={v}" for k, v in cell["case"].items())
        name = f"{summary['suite']}::{cell['subject']}_vs_{cell['against']}::{cell['metric']}[{settings}]"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:   # two rows with the same settings stay two tests
            name += f"#{seen[name]}"
        items.append(ParityCell.from_parent(session, name=name, nodeid=f"llama-parity::{name}", cell=cell,
                                            summary=summary))

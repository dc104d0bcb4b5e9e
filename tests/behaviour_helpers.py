"""Shared by the behaviour-suite tests: run suites on a tiny model with the real policy."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import behaviour_cli
from harness.suites.behaviour.common import BehaviourRun


def run_suite(model: Path, out: Path, suite: str, plant: str | None = None, dtypes=("float32",),
              attns=("eager",)) -> tuple[int, list[dict]]:
    run = BehaviourRun(model=model, dtypes=list(dtypes), attns=list(attns), plant=plant, out=out)
    code = behaviour_cli.run_suites(run, [suite])
    cells = json.loads((out / suite / "summary.json").read_text())["cells"]
    return code, cells


def failing(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c["status"] == "fail"]


def cli(argv: list[str]) -> int:
    """The `behaviour` subcommand through argparse, as harness/cli.py will register it."""
    from harness.core.errors import InputError
    parser = argparse.ArgumentParser(prog="llama-parity")
    behaviour_cli.register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except InputError:
        return 2

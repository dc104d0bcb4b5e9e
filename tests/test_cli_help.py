"""`llama-parity --help` and every command's: each command and flag explained with its default, the
two spellings of a flag landing in one place, and a flag a command does not take refused (exit 2)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.cli import ALIASES, MEMORY_CHECKED, PROGRESS_BARS, HelpFormatter, build_parser, commands, main

PARSER = build_parser()
NAMES = [c.name for c in commands()]


def options(name: str) -> list[argparse.Action]:
    return [a for a in PARSER.commands[name]._actions if a.option_strings and a.dest != "help"]


def test_every_command_is_listed_with_a_one_line_description(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = PARSER._subparsers._group_actions[0]._choices_actions
    assert [c.dest for c in listed] == NAMES
    for c in listed:
        assert c.help and "\n" not in c.help, c.dest
        assert re.search(rf"^\s+{re.escape(c.dest)}\b", out, re.M), f"{c.dest} missing from llama-parity --help"
    assert "exit codes" in out


@pytest.mark.parametrize("name", NAMES)
def test_every_option_has_help_and_shows_its_default(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    fmt = HelpFormatter(PARSER.commands[name].prog)
    for a in options(name):
        text = fmt._get_help_string(a)
        assert a.help and a.help.strip(), f"{name} {a.option_strings[0]}: no help"
        if not a.required and a.nargs != 0:     # a switch's default is off; a required flag has none
            assert "default" in text.lower(), f"{name} {a.option_strings[0]}: no default shown: {text!r}"
        if a.default not in (None, False) and not isinstance(a.default, (list, tuple)):
            assert str(a.default) in text, f"{name} {a.option_strings[0]}: {a.default!r} not in {text!r}"
        for spelling in a.option_strings:
            assert spelling in out, f"{name} --help does not show {spelling}"
    assert "exit codes" in out


def test_a_default_already_in_the_help_is_not_said_twice():
    p = cli.Parser(prog="t", formatter_class=HelpFormatter)
    said = p.add_argument("--seed", default="0", help="input seed (default 0)")
    unsaid = p.add_argument("--shard", default="1", help="shards")
    listed = p.add_argument("--suite", default=["all"], help="which")
    fmt = HelpFormatter("t")
    assert fmt._get_help_string(said) == "input seed (default 0)"
    assert fmt._get_help_string(unsaid) == "shards (default: 1)"
    assert fmt._get_help_string(listed) == "which (default: all)"
    assert "default: 100%%" in fmt._get_help_string(p.add_argument("--pct", default="100%", help="x"))


def test_hyphenated_names_are_not_broken_across_lines(capsys):
    assert main(["logits", "--help"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"[a-z]-\n", out), "a name like norm-low-precision was split over two lines"


def _aliased(name: str) -> list[tuple[str, str, argparse.Action]]:
    return [(s, ALIASES[s], a) for a in options(name) for s in a.option_strings if s in ALIASES]


@pytest.mark.parametrize("name", NAMES)
def test_aliases_are_offered_together_and_parse_to_the_same_dest(name):
    for spelling, alias, action in _aliased(name):
        assert alias in action.option_strings, f"{name}: {spelling} without {alias}"
        value = "bfloat16" if "dtype" in spelling else "2"      # differs from every default
        required = [x for a in options(name) if a.required for x in (a.option_strings[0], "x")]
        one = PARSER.parse_args([name, *required, spelling, value])
        other = PARSER.parse_args([name, *required, alias, value])
        assert getattr(one, action.dest) == getattr(other, action.dest) != action.default


def test_the_aliases_exist_where_the_issue_asks():
    for name in ("logits", "behaviour", "axes", "mp", "bench", "localise", "stream", "place"):
        spellings = {s for a in options(name) for s in a.option_strings}
        assert {"--dtype", "--dtypes"} <= spellings, name
    for name in ("logits", "localise"):
        a = PARSER.parse_args([name, "--pretraining-tp", "1"])
        assert a.tp == (["1"] if name == "logits" else "1")


# The flags the CLI no longer offers where they change nothing.
REMOVED = [(n, "--no-progress") for n in NAMES if n not in PROGRESS_BARS] + \
          [(n, "--memory-budget") for n in NAMES if n not in MEMORY_CHECKED]


def _valid_rest(name: str, where: Path) -> list[str]:
    """The command's required flags with values it parses, and --out: a line wrong only in the flag tried."""
    argv = []
    for a in options(name):
        if a.required or a.option_strings[0] == "--out":
            argv += [a.option_strings[0], a.choices[0] if a.choices else str(where / a.dest)]
    return argv


@pytest.mark.parametrize("name,flag", REMOVED, ids=[f"{n}{f}" for n, f in REMOVED])
def test_a_flag_the_command_does_not_take_is_refused_naming_it(name, flag, tmp_path, capsys):
    value = [] if flag == "--no-progress" else ["1GiB"]
    assert main([name, *_valid_rest(name, tmp_path), flag, *value]) == 2
    err = capsys.readouterr().err
    assert f"llama-parity {name}: unrecognized arguments: {flag}" in err, err
    assert f"usage: llama-parity {name}" in err, "the usage shown is not the command's"
    assert list(tmp_path.iterdir()) == []


def test_the_shared_flags_are_offered_where_they_mean_something():
    """--no-progress where a suite draws bars, --memory-budget where it estimates its memory: read
    from each suite's own source, so a suite that starts (or stops) doing either fails here until
    harness/cli.py's tables say so."""
    for cmd in commands():
        spellings = {s for a in options(cmd.name) for s in a.option_strings}
        if not cmd.suite:               # a tool writes no report and draws no bars
            assert not {"--html", "--verbose", "--no-progress", "--memory-budget"} & spellings, cmd.name
            continue
        src = Path(sys.modules[type(cmd).__module__].__file__)
        text = "".join(f.read_text() for f in (src.parent.rglob("*.py") if src.name == "__init__.py" else [src]))
        assert ("--no-progress" in spellings) == ("ctx.progress" in text), cmd.name
        assert ("--memory-budget" in spellings) == ("check_memory(" in text), cmd.name
        assert {"--out", "--html", "--verbose"} <= spellings, cmd.name


def test_usage_errors_exit_2_with_the_harness_prefix(capsys):
    assert main(["logits", "--dtypes"]) == 2                    # a value missing
    assert "llama-parity: error: llama-parity logits: argument --dtypes/--dtype" in capsys.readouterr().err
    assert main(["nope"]) == 2                                   # an unknown command
    assert "llama-parity: error: llama-parity: argument COMMAND: invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["mp", "--ranks", "bogus"]) == 2
    assert "--ranks: invalid choice" in capsys.readouterr().err

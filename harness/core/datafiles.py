"""The data files under suites/: versioned TOML, read with errors that name the file and key."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from harness.core import SUITES
from harness.core.errors import InputError


def parse_toml(path: Path, arg: str) -> dict[str, Any]:
    """A TOML file the user named with option arg: what is not a readable file, or not TOML, is exit 2."""
    from harness.core.inputs import path_problem
    path = Path(path)
    if problem := path_problem(path):
        raise InputError(f"{arg}: {path}: {problem}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{arg} {path}: not valid TOML ({e})") from None


def read_toml(path: Path, arg: str) -> dict[str, Any]:
    """A TOML file with a string 'version'; arg names the option that chose it (for the message)."""
    data = parse_toml(path, arg)
    if not isinstance(data.get("version"), str):
        raise InputError(f"{path}: missing string key 'version'")
    return data


def suite_data(name: str) -> dict[str, Any]:
    """suites/<name>.toml: a suite's cases, defaults and thresholds (reviewed like code)."""
    return read_toml(SUITES / f"{name}.toml", f"suites/{name}.toml")


def table(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise InputError(f"{where}: missing table [{key}]")
    return value


def ints(data: dict, key: str, where: str, low: int = 1) -> list[int]:
    value = data.get(key)
    if not (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                      and v >= low for v in value)):
        raise InputError(f"{where}: [{key}] must be a non-empty list of integers >= {low}")
    return value


def integer(data: dict, key: str, where: str, low: int = 0) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{where}: {key} must be an integer >= {low}")
    return value

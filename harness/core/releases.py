"""The transformers releases this project tests (suites/releases.toml), and whether one is among them.

One list: the environment block of every summary says whether the installed release is on it (the
untested-release banner of every view reads that), pyproject.toml's constraint and tox.ini's pins
are checked against it by tests/test_versions.py.
"""
from __future__ import annotations

from functools import lru_cache

from harness.core import SUITES

RELEASES = SUITES / "releases.toml"


@lru_cache(maxsize=1)
def tested() -> tuple[str, ...]:
    import tomllib
    with open(RELEASES, "rb") as f:
        return tuple(tomllib.load(f)["tested"])


def is_tested(version: str | None) -> bool | None:
    """True or False for a release; None when transformers is not installed (nothing to say)."""
    if not version:
        return None
    return version.split("+")[0] in tested()

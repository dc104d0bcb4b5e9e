"""The tokenizer suite's catalogue (suites/tokenizer.toml): cases to check and known divergences."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import SUITES, deviations
from harness.core.datafiles import read_toml
from harness.core.errors import InputError

CASES_FILE = SUITES / "tokenizer.toml"


@dataclass
class Catalogue:
    version: str
    encode: list[dict[str, Any]]
    decode: list[dict[str, Any]]
    batch: list[dict[str, Any]]
    padding: list[dict[str, Any]]
    known: list[deviations.Deviation]


def load_catalogue(path: Path = CASES_FILE) -> Catalogue:
    data = read_toml(path, "--cases")
    enc = []
    for c in data.get("encode", []):
        if "name" not in c or not isinstance(c.get("text"), str):
            raise InputError(f"{path}: an [[encode]] case needs a name and a text: {c!r}")
        enc.append({**c, "text": c["text"] * int(c.get("repeat", 1))})
    for c in data.get("decode", []):
        if "name" not in c or ("ids" in c) == ("pieces" in c):
            raise InputError(f"{path}: a [[decode]] case needs a name and exactly one of ids/pieces: {c!r}")
    names = [c["name"] for kind in ("encode", "decode", "batch", "padding") for c in data.get(kind, [])]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{path}: case names repeat: {', '.join(dupes)}")
    return Catalogue(data["version"], enc, list(data.get("decode", [])), list(data.get("batch", [])),
                     list(data.get("padding", [])), deviations.read(data, str(path)))

"""Every value a user hands the harness, validated once, here.

Each function takes the argument's name (``--dtypes``, or a file path) so that its error names
it, and raises ``InputError`` (exit 2). Numbers are ASCII digits only: ``'²'.isdigit()`` is true
and ``int('٣')`` is 3, neither of which a user meant. Sizes are bounded before anything is
allocated from them (``harness.core.resources`` then checks the memory a run needs).
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from harness.core.cases import Shape
from harness.core.errors import InputError

KNOWN_DTYPES = ("float32", "bfloat16", "float16")
KNOWN_ATTN = ("eager", "sdpa", "flash_attention_2", "flex_attention")
MAX_SEED = 2 ** 31 - 1
MAX_BATCH, MAX_SEQ = 4096, 1 << 20       # beyond any Llama 2 run; memory is checked separately
MAX_JSON_DEPTH = 64                      # token files and configs are 1-3 levels deep
_ASCII_INT = re.compile(r"[0-9]+")


def csv(value: str) -> list[str]:
    """argparse type for comma lists: 'a, b,,c' -> ['a', 'b', 'c']."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


def choices(arg: str, values: list[str], known: tuple[str, ...] | list[str]) -> list[str]:
    """values, each one of known, without repeats (order kept); an empty list is an error."""
    if not values:
        raise InputError(f"{arg}: no value given (choose from {', '.join(known)})")
    for v in values:
        if v not in known:
            raise InputError(f"{arg}: unknown value {v!r} (choose from {', '.join(known)})")
    return list(dict.fromkeys(values))


def choice(arg: str, value: str, known: tuple[str, ...] | list[str]) -> str:
    return choices(arg, [value], known)[0]


def integer(arg: str, value: Any, low: int = 0, high: int = MAX_SEED) -> int:
    """An integer in [low, high] written in ASCII digits (an int passes through the same bounds)."""
    if isinstance(value, bool):
        raise InputError(f"{arg}: {value!r} is not an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and _ASCII_INT.fullmatch(value.strip()):
        digits = value.strip().lstrip("0") or "0"
        if len(digits) > len(str(high)):    # int() of thousands of digits is slow, then refused by Python
            raise InputError(f"{arg}: {_clip(value.strip())} is out of range ({low}..{high})")
        n = int(digits)
    else:
        raise InputError(f"{arg}: {value!r} is not a whole number in ASCII digits")
    if not low <= n <= high:
        raise InputError(f"{arg}: {_clip(str(n)) if abs(n) < 10 ** 4000 else 'a number'} is out of range "
                         f"({low}..{high})")
    return n


def _clip(text: str, n: int = 40) -> str:
    """A value short enough to quote in a message (a 5000-digit number is named by its length)."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def positive_ints(arg: str, values: list[str], high: int = 4096) -> list[int]:
    if not values:
        raise InputError(f"{arg}: no value given")
    return list(dict.fromkeys(integer(arg, v, 1, high) for v in values))


def seed(value: Any) -> int:
    return integer("--seed", value, 0, MAX_SEED)


def shape(arg: str, spec: str) -> Shape:
    m = re.fullmatch(r"([0-9]+)x([0-9]+)", str(spec).strip())
    if not m or not m[1].strip("0") or not m[2].strip("0"):
        raise InputError(f"{arg}: {_clip(repr(spec))} is not BATCHxSEQ with positive numbers (e.g. 2x64)")
    if max(len(m[1].lstrip("0")), len(m[2].lstrip("0"))) > 12:   # never int() of thousands of digits
        raise InputError(f"{arg}: {_clip(repr(spec))} is larger than the harness runs (batch <= {MAX_BATCH}, "
                         f"sequence <= {MAX_SEQ})")
    b, s = int(m[1]), int(m[2])
    if b > MAX_BATCH or s > MAX_SEQ:
        raise InputError(f"{arg}: {spec!r} is larger than the harness runs (batch <= {MAX_BATCH}, "
                         f"sequence <= {MAX_SEQ})")
    return Shape(b, s)


def shapes(arg: str, specs: list[str]) -> list[Shape]:
    if not specs:
        raise InputError(f"{arg}: no shape given (e.g. 1x16,2x64)")
    return list(dict.fromkeys(shape(arg, s) for s in specs))


def device(value: str) -> str:
    """cpu, cuda or cuda:N, and the device must exist on this machine."""
    import torch
    if value == "cpu":
        return value
    m = re.fullmatch(r"cuda(?::([0-9]+))?", str(value))
    if not m:
        raise InputError(f"--device: unknown device {value!r} (cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise InputError(f"--device {value}: no CUDA device is available on this machine")
    if len(m[1] or "") > 6 or int(m[1] or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {value}: only {torch.cuda.device_count()} CUDA device(s)")
    return value


def path_arg(arg: str, value: Any) -> Path:
    """The path an argument names. argparse (3.11) hands '--x=--' over as [] instead of a string."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise InputError(f"{arg}: {value!r} is not a path")
    return Path(value)


def out_dir(value: str | Path, arg: str = "--out") -> Path:
    """An output folder that is (or can become) a writable folder; nothing is created here."""
    path = path_arg(arg, value)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        problem = path_problem(path, "folder")
        if problem:
            raise InputError(f"{arg}: {path}: {problem}")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{arg}: {path}: {probe} is a file, so the folder cannot be made")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{arg}: {path}: {probe} is not writable")
    return path


def printable(x: Any) -> str:
    """Text that can be printed or written as UTF-8. A path Python read from the command line or a
    folder keeps the bytes that are not UTF-8 as lone surrogates (surrogateescape, e.g. '\\udce9'
    for a Latin-1 'é'); they are shown as \\xNN, any other lone surrogate as \\uNNNN."""
    s = str(x)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return "".join(f"\\x{ord(ch) - 0xdc00:02x}" if 0xdc80 <= ord(ch) <= 0xdcff else
                       f"\\u{ord(ch):04x}" if 0xd800 <= ord(ch) <= 0xdfff else ch for ch in s)


def path_problem(path: Path, want: str = "file") -> str | None:
    """Why ``path`` cannot be read as a regular file (want="file") or used as a folder
    (want="folder"), in words that name the real problem; None when it can."""
    import stat
    path = Path(path)
    try:
        st = path.stat()
    except RuntimeError:                 # Python 3.11's pathlib on a symlink loop
        return "a symbolic link that loops (it points, directly or not, at itself)"
    except OSError as e:
        if path.is_symlink():
            if e.errno == errno.ELOOP:
                return "a symbolic link that loops (it points, directly or not, at itself)"
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"a dangling symbolic link (to {target}, which does not exist)"
        if e.errno == errno.ENOTDIR:
            return "not found (a part of the path before it is a file, not a folder)"
        if e.errno == errno.EACCES:
            return "not readable (permission denied)"
        return "file not found" if want == "file" else "no such folder"
    kind = ("folder" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else
            "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
    if kind == want:
        return None
    if kind in ("folder", "file"):
        return f"a {kind}, not a {want}"
    return f"{kind}, not a regular {want}"


def existing_file(arg: str, value: str | Path) -> Path:
    path = path_arg(arg, value)
    problem = path_problem(path)
    if problem:
        raise InputError(f"{arg} {path}: {problem}")
    return path


def read_json(arg: str, path: Path, max_bytes: int = 256 << 20) -> Any:
    """A JSON file, refusing what cannot be a real input: huge, not UTF-8, invalid, too deep."""
    path = existing_file(arg, path)
    if path.stat().st_size > max_bytes:
        raise InputError(f"{arg} {path}: {path.stat().st_size} bytes, larger than {max_bytes} allowed")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{arg} {path}: not valid JSON ({e})") from None
    return parse_json(f"{arg} {path}", text)


def parse_json(where: str, text: str) -> Any:
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"{where}: nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None


def json_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, counted without parsing (json.loads recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def token_file(path: str | Path, arg: str = "--tokens") -> list[list[int]]:
    """A JSON list of equal-length, non-empty lists of token ids (ranges are checked against the
    model's vocabulary once its config is read: ``token_ids_in_vocab``)."""
    path = Path(path)
    data = read_json(arg, path)
    where = f"{arg} {path}"
    if not isinstance(data, list) or not data:
        raise InputError(f"{where}: expected a non-empty JSON list of token-id lists")
    if len(data) > MAX_BATCH:
        raise InputError(f"{where}: {len(data)} rows, more than {MAX_BATCH}")
    for i, row in enumerate(data):
        if not isinstance(row, list) or not row:
            raise InputError(f"{where}: [{i}]: expected a non-empty list of token ids")
        if len(row) != len(data[0]):
            raise InputError(f"{where}: [{i}]: {len(row)} ids, but [0] has {len(data[0])} "
                             f"(rows must have equal length)")
        if len(row) > MAX_SEQ:
            raise InputError(f"{where}: [{i}]: {len(row)} ids, more than {MAX_SEQ}")
        for j, t in enumerate(row):
            if not isinstance(t, int) or isinstance(t, bool):
                raise InputError(f"{where}: [{i}][{j}]: {t!r} is not an integer token id")
    return data


def token_ids_in_vocab(where: str, rows: list[list[int]], vocab: int) -> None:
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if not 0 <= t < vocab:
                raise InputError(f"{where}: [{i}][{j}]: token id {t} is out of range "
                                 f"(the model's vocabulary is 0..{vocab - 1})")


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
MAX_SIZE = 2 ** 60                       # 1024 PiB: beyond any machine's memory or disk


def size(arg: str, value: str) -> int:
    """'20GiB', '512MB', '1000000' -> bytes."""
    m = _SIZE.fullmatch(str(value).strip())
    if not m:
        raise InputError(f"{arg}: {_clip(repr(value))} is not a size (e.g. 20GiB, 512MB, 1000000)")
    number = float(m[1]) * _UNITS[(m[2] or "b").lower()]
    if not math.isfinite(number) or number >= MAX_SIZE:     # float('9' * 400) is inf: int(inf) raises
        raise InputError(f"{arg}: {_clip(repr(value))} is larger than any machine (at most {MAX_SIZE // _UNITS['pib']} PiB)")
    return int(number)

#!/usr/bin/env python3
"""The museum of real regressions: the harness itself must catch real, historical transformers
Llama bugs on the release that had them, and pass the same check on the release without them.

    [PYTHON=VENV/bin/python] python scripts/history.py run [--out reports/history] [--only ID,...]
                                                           [--no-protobuf-shim]
    python scripts/history.py merge [--out reports/history]
    python scripts/history.py list
    python scripts/history.py harness ARGS...      (the harness CLI, with the protobuf shim; see below)

The catalogue is suites/history.toml: one [[entry]] per bug, with the release where the harness
must catch it (bug_release), the release where the same check must pass (ok_release), the
harness command (argv, with placeholders for fixtures built here with `make-model`) and the row
pattern that counts as "caught" (fnmatch over the row's fields and its case settings).

`run` takes the installed transformers (whatever `$PYTHON -c "import transformers"` gives, $PYTHON
defaulting to this interpreter: a tox env, a venv, or a wheel unpacked on PYTHONPATH), runs every in-scope entry whose bug_release or
ok_release equals it, and writes, per entry, reports/history/transformers-<version>/<id>/: the
harness's own output folder, pruned to its report.md, plus verdict.json (the verdict and the
matching rows) and matched.jsonl (every row in the entry's scope, whatever its status).
`merge` renders reports/history/README.md from every verdict.json found. Both exit 1 when an
entry is not caught on its bug release, still fails (or is not measured) on its ok release, or
(merge) has not been run on one of its releases; 2 on a malformed catalogue.

The protobuf shim: the harness's tokenizer suite imports sentencepiece's sentencepiece_model_pb2
before transformers does; transformers 4.x ships its own copy of the same .proto
(transformers/utils/sentencepiece_model_pb2*.py), and with protobuf >= 4 (upb) registering a
second, different "sentencepiece_model.proto" raises TypeError, so every transformers tokenizer
that reads the proto (all fast tokenizers, the 4.32+ slow legacy=False path) fails to load and
becomes an n/a row. `harness` first checks whether that conflict happens in this interpreter
and, only then, points transformers' module names at sentencepiece's (the same messages) before
handing over to the harness CLI. verdict.json records whether the shim was applied.

The harness itself now asks transformers for its proto module (harness.core.real_tokenizer.
model_proto_module), so the conflict no longer arises and the shim finds nothing to do; it stays
for trees older than that fix, and `--no-protobuf-shim` shows the harness running as it is.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE_FILE = ROOT / "suites" / "history.toml"
DEFAULT_OUT = ROOT / "reports" / "history"

# Placeholders an entry's argv may use, and what fills them (Fixtures below).
PLACEHOLDERS = {
    "tokenizer": "the real Llama 2 tokenizer.model (the harness's fixture, `llama-parity fixtures`)",
    "model_gqa_hf": "`make-model --preset tiny-gqa --format hf` (GQA 8/2 heads, vocab 512)",
    "odd_vocab_model": "`make-model --preset tiny-mha --vocab-size 513` (Meta format): a vocabulary pretraining_tp=2 "
                       "does not divide",
    "llama_checkpoint_folder": "{model_gqa_hf} plus tokenizer.model and the tokenizer_config.json the 4.x slow "
                               "LlamaTokenizer writes (legacy=false), no tokenizer.json: a Llama checkpoint folder "
                               "as a user has it",
}
REQUIRED = ("id", "title", "mechanism", "source", "affected")
REQUIRED_IN_SCOPE = ("bug_release", "ok_release", "ok_kind", "argv", "caught")
OK_KINDS = ("fixed", "before-regression", "intended-change")
# An entry about transformers with peft names the peft release installed beside each release (both or none);
# it runs only where that peft is installed (the history-tfNNNN env pins it).
PEFT_FIELDS = ("bug_peft", "ok_peft")
STATUSES = ("pass", "fail", "info", "n/a")
ROW_FIELDS = ("suite", "subject", "against", "metric", "status", "reason")   # the rest are case settings
CASE_FIELDS = ("kind", "case", "loader", "flags", "dtype", "device", "attn", "padding", "cast", "length",
               "positions", "region", "tp", "shape", "input", "checkpointing")                    # the settings the suites' rows carry
COMMANDS = ("tokenizer", "behaviour", "axes", "logits", "train")                    # harness suites entries may run
OK_VERDICTS = {"bug": ("caught",), "ok": ("passes",)}
SHIM_MARK = "history: protobuf shim applied"
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


class CatalogueError(ValueError):
    """suites/history.toml is malformed (exit 2)."""


# --- the catalogue --------------------------------------------------------------------------------

def load(path: Path = SUITE_FILE) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CatalogueError(f"{path}: {e}") from None
    problems = validate(data)
    if problems:
        raise CatalogueError(f"{path}:\n  " + "\n  ".join(problems))
    return data


def _release_ok(v: Any) -> bool:
    return isinstance(v, str) and bool(VERSION_RE.match(v))


def validate(data: dict[str, Any]) -> list[str]:
    """Every problem with the catalogue, each naming the entry and the field ([] when valid)."""
    out: list[str] = []
    if not isinstance(data.get("version"), str) or not data.get("version"):
        out.append("top level: 'version' must be a non-empty string")
    entries = data.get("entry")
    if not isinstance(entries, list) or not entries:
        return out + ["top level: no [[entry]] tables"]
    seen: set[str] = set()
    for i, e in enumerate(entries):
        where = f"entry {i} ({e.get('id', '?')})"
        for k in REQUIRED:
            if k not in e:
                out.append(f"{where}: missing '{k}'")
        if e.get("id") in seen:
            out.append(f"{where}: duplicate id")
        seen.add(e.get("id"))
        if not isinstance(e.get("source", []), list) or not all(isinstance(s, str) for s in e.get("source", [])):
            out.append(f"{where}: 'source' must be a list of strings")
        if not isinstance(e.get("in_scope", True), bool):
            out.append(f"{where}: 'in_scope' must be true or false")
        if not e.get("in_scope", True):
            if not e.get("out_of_scope_reason"):
                out.append(f"{where}: out of scope without 'out_of_scope_reason'")
            continue
        for k in REQUIRED_IN_SCOPE:
            if k not in e:
                out.append(f"{where}: missing '{k}'")
        for k in ("bug_release", "ok_release"):
            if k in e and not _release_ok(e[k]):
                out.append(f"{where}: '{k}' = {e[k]!r} is not a release X.Y.Z")
        if e.get("bug_release") is not None and e.get("bug_release") == e.get("ok_release"):
            out.append(f"{where}: bug_release and ok_release are the same release")
        peft = [k for k in PEFT_FIELDS if k in e]
        if peft and len(peft) != len(PEFT_FIELDS):
            out.append(f"{where}: {' and '.join(PEFT_FIELDS)} go together (the peft release beside each release)")
        for k in peft:
            if not _release_ok(e[k]):
                out.append(f"{where}: '{k}' = {e[k]!r} is not a release X.Y.Z")
        if "ok_kind" in e and e["ok_kind"] not in OK_KINDS:
            out.append(f"{where}: 'ok_kind' = {e['ok_kind']!r} is not one of {', '.join(OK_KINDS)}")
        if "ok_accepts_na" in e and not (isinstance(e["ok_accepts_na"], str) and e["ok_accepts_na"]):
            out.append(f"{where}: 'ok_accepts_na' must be the reason n/a rows count as passing")
        out += [f"{where}: {p}" for p in _argv_problems(e.get("argv"))]
        out += [f"{where}: {p}" for p in pattern_problems(e.get("caught"), "caught")]
    return out


def _argv_problems(argv: Any) -> list[str]:
    if argv is None:
        return []
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return ["'argv' must be a non-empty list of strings"]
    out = []
    if argv[0] not in COMMANDS:
        out.append(f"'argv' starts with {argv[0]!r}, not a harness suite ({', '.join(COMMANDS)})")
    for a in argv:
        if a in ("--out", "--no-progress", "--html") or a.startswith("--out="):
            out.append(f"'argv' must not hold {a}: scripts/history.py adds --out (and draws no progress bars)")
        for name in placeholders_in(a):
            if name not in PLACEHOLDERS:
                out.append(f"'argv' uses unknown placeholder {{{name}}} (known: {', '.join(PLACEHOLDERS)})")
    return out


def placeholders_in(arg: str) -> list[str]:
    return re.findall(r"\{([^{}]*)\}", arg)


def pattern_problems(p: Any, name: str = "pattern") -> list[str]:
    if not isinstance(p, dict) or not p:
        return [f"'{name}' must be a table of field = fnmatch pattern"]
    out = []
    for k, v in p.items():
        if k not in ROW_FIELDS + CASE_FIELDS:
            out.append(f"'{name}.{k}' is no row field or case setting (known: {', '.join(ROW_FIELDS + CASE_FIELDS)})")
        if not isinstance(v, str):
            out.append(f"'{name}.{k}' must be a string pattern, not {type(v).__name__}")
            continue
        try:
            fnmatch.translate(v)
            re.compile(fnmatch.translate(v))
        except re.error as e:
            out.append(f"'{name}.{k}' = {v!r} does not parse: {e}")
    if p.get("status") != "fail":
        out.append(f"'{name}.status' must be \"fail\" (a caught bug is a failing row)")
    for k in ("subject", "metric"):
        if k not in p:
            out.append(f"'{name}' must name '{k}'")
    return out


def in_scope(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in data["entry"] if e.get("in_scope", True)]


def releases(data: dict[str, Any]) -> list[str]:
    """Every release an in-scope entry runs on, oldest first."""
    rs = {e[k] for e in in_scope(data) for k in ("bug_release", "ok_release")}
    return sorted(rs, key=lambda v: tuple(int(x) for x in v.split(".")))


def checks_for(data: dict[str, Any], version: str, peft: str | None = None) -> list[tuple[dict[str, Any], str]]:
    """(entry, role) pairs to run on this release; role "bug" or "ok". An entry that pins peft for
    the role runs only beside that peft release (see waiting_for)."""
    return [(e, role) for e in in_scope(data) for role in ("bug", "ok")
            if e[f"{role}_release"] == version and e.get(f"{role}_peft", peft) == peft]


def waiting_for(data: dict[str, Any], version: str, peft: str | None) -> list[tuple[dict[str, Any], str]]:
    """Checks of this release that need another peft than the installed one (named, never skipped silently)."""
    return [(e, role) for e in in_scope(data) for role in ("bug", "ok")
            if e[f"{role}_release"] == version and f"{role}_peft" in e and e[f"{role}_peft"] != peft]


def pairing(entry: dict[str, Any], role: str) -> str:
    """The release a check runs on, with its peft where the entry pins one: '4.33.3' or '4.33.3 + peft 0.5.0'."""
    rel = entry[f"{role}_release"]
    return f"{rel} + peft {entry[f'{role}_peft']}" if f"{role}_peft" in entry else rel


# --- the verdict ----------------------------------------------------------------------------------

def field_value(cell: dict[str, Any], key: str) -> str:
    """A row's field: suite/subject/against/metric/status/reason, else a case setting ('' if absent)."""
    v = cell.get(key) if key in ROW_FIELDS else (cell.get("case") or {}).get(key)
    return "" if v is None else str(v)


def matches(cell: dict[str, Any], pattern: dict[str, str]) -> bool:
    return all(fnmatch.fnmatchcase(field_value(cell, k), p) for k, p in pattern.items())


def scope(pattern: dict[str, str]) -> dict[str, str]:
    """The cells the check is about, whatever their verdict: the pattern without status and reason."""
    return {k: v for k, v in pattern.items() if k not in ("status", "reason")}


def decide(entry: dict[str, Any], role: str, cells: list[dict[str, Any]], exit_code: int = 0) -> dict[str, Any]:
    """caught / not caught (bug release), passes / still fails / not measured (ok release)."""
    pattern = entry["caught"]
    in_scope_rows = [c for c in cells if matches(c, scope(pattern))]
    counts = {s: sum(c.get("status") == s for c in in_scope_rows) for s in STATUSES}
    harness_error = exit_code not in (0, 1)
    if role == "bug":
        hits = [c for c in cells if matches(c, pattern)]
        verdict = "caught" if hits else "not caught"
        why = (f"{len(hits)} row(s) match the pattern" if hits else
               f"no row matches the pattern ({len(in_scope_rows)} row(s) in scope: {counts})")
    elif role == "ok":
        hits = [c for c in in_scope_rows if c.get("status") == "fail"]
        measured = [c for c in in_scope_rows if c.get("status") in ("pass", "info")]
        na = [c for c in in_scope_rows if c.get("status") == "n/a"]
        if hits:
            verdict, why = "still fails", f"{len(hits)} row(s) in scope fail"
        elif measured:
            verdict, why = "passes", f"{len(measured)} row(s) in scope pass (or are known, info), none fails"
        elif na and entry.get("ok_accepts_na"):
            verdict, why = "passes", f"{len(na)} row(s) in scope are n/a, accepted: {entry['ok_accepts_na']}"
            hits = na
        else:
            verdict, why = "not measured", f"no row in scope passes ({counts}): the check did not run"
            hits = na
        if not hits:
            hits = measured
    else:
        raise ValueError(f"role {role!r}")
    if harness_error:   # rows that were written still count; the exit code is named beside them
        why += f"; the harness exited {exit_code} ({'bad input' if exit_code == 2 else 'harness error'})"
    hits = sorted(hits, key=strength, reverse=True)   # the strongest evidence, or the closest pass, first
    return {"verdict": verdict, "ok": verdict in OK_VERDICTS[role], "why": why, "rows": hits,
            "in_scope_counts": counts, "in_scope": in_scope_rows}


def strength(cell: dict[str, Any]) -> float:
    """How far past its tolerance a row is (inf for a crash or a tolerance of 0): strongest rows first."""
    v, t = cell.get("value"), cell.get("tolerance")
    if not isinstance(v, (int, float)) or v != v:       # None or NaN: an error row, the plainest evidence
        return float("inf")
    if not isinstance(t, (int, float)) or t != t or t <= 0:
        return float("inf") if v > 0 else 0.0
    return v / t


def read_cells(folder: Path) -> list[dict[str, Any]]:
    """Every cell of every summary.json the harness wrote under folder (one per suite part)."""
    cells = []
    for p in sorted(Path(folder).rglob("summary.json")):
        data = json.loads(p.read_text(encoding="utf-8"))
        for c in data.get("cells", []):
            c = dict(c)
            c.setdefault("part", str(p.parent.relative_to(folder)) if p.parent != Path(folder) else ".")
            cells.append(c)
    return cells


def read_subjects(folder: Path) -> list[dict[str, Any]]:
    """The tokenizer suite's subjects (class each loader resolved to, or why it is n/a)."""
    out = []
    for p in sorted(Path(folder).rglob("summary.json")):
        subjects = json.loads(p.read_text(encoding="utf-8")).get("subjects")
        if isinstance(subjects, list):
            out += [s for s in subjects if isinstance(s, dict)]
    return out


def subjects_of(rows: list[dict[str, Any]], subjects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = {(r.get("subject"), (r.get("case") or {}).get("loader"), (r.get("case") or {}).get("flags")) for r in rows}
    return [s for s in subjects if (s.get("subject"), s.get("loader"), s.get("flags")) in keys]


def slim(cell: dict[str, Any], limit: int = 24) -> dict[str, Any]:
    """A row small enough to commit: long lists in extra are cut (the count is kept)."""
    def cut(v: Any) -> Any:
        if isinstance(v, list) and len(v) > limit:
            return v[:limit] + [f"... {len(v) - limit} more"]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v
    return {k: (cut(v) if k == "extra" else v) for k, v in cell.items()}


def describe(cell: dict[str, Any], width: int = 220) -> str:
    """One line for a row: subject [case settings] metric: status, reason."""
    raw = cell.get("case") or {}
    first = [k for k in ("case", "loader", "flags") if k in raw]
    case = {k: raw[k] for k in first + [k for k in raw if k not in first]
            if k not in ("device", "kind") and raw[k] not in ("", None)}
    settings = ", ".join(f"{v}" if k in first else f"{k}={v}" for k, v in case.items())
    reason = (cell.get("reason") or "").replace("\n", " ")
    v, t = cell.get("value"), cell.get("tolerance")
    if not reason and isinstance(v, (int, float)) and isinstance(t, (int, float)):
        reason = f"{v:.3g} <= {t:.3g}"
    text = f"{cell.get('subject')} [{settings}] {cell.get('metric')}: {cell.get('status')}" + (f" - {reason}" if reason else "")
    return text if len(text) <= width else text[:width - 3] + "..."


# --- fixtures -------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("LLAMA_PARITY_CACHE") or Path.home() / ".cache" / "llama-parity")


class Fixtures:
    """Builds, once and on demand, what the placeholders name (with the harness's own make-model)."""

    TOKENIZER_CONFIG = {
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "pad_token": None, "sp_model_kwargs": {}, "legacy": False, "model_max_length": 4096,
        "padding_side": "right", "tokenizer_class": "LlamaTokenizer",
    }

    def __init__(self, root: Path | None = None, python: str = sys.executable):
        self.root = root or cache_root() / "history-fixtures"
        self.python = python
        self.built: dict[str, str] = {}

    def _harness(self, *args: str) -> str:
        r = subprocess.run([self.python, "-m", "harness", *args], cwd=ROOT, env=harness_env(),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-parity {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def _make(self, name: str, *args: str) -> Path:
        out = self.root / name
        if not any(out.glob("*.json")):
            shutil.rmtree(out, ignore_errors=True)
            self._harness("make-model", *args, "--out", str(out))
        return out

    def get(self, name: str) -> str:
        if name not in self.built:
            self.built[name] = str(getattr(self, f"_{name}")())
        return self.built[name]

    def _tokenizer(self) -> Path:
        code = "from harness.core.real_tokenizer import ensure_tokenizer_model; print(ensure_tokenizer_model())"
        r = subprocess.run([self.python, "-c", code], cwd=ROOT, env=harness_env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building the Llama 2 tokenizer fixture failed:\n{r.stderr}")
        return Path(r.stdout.strip().splitlines()[-1])

    def _model_gqa_hf(self) -> Path:
        return self._make("tiny-gqa-hf", "--preset", "tiny-gqa", "--format", "hf")

    def _odd_vocab_model(self) -> Path:
        return self._make("tiny-mha-vocab513", "--preset", "tiny-mha", "--vocab-size", "513")

    def _llama_checkpoint_folder(self) -> Path:
        out = self.root / "llama-checkpoint-folder"
        if not (out / "tokenizer_config.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(self.get("model_gqa_hf"), out)
            shutil.copyfile(self.get("tokenizer"), out / "tokenizer.model")
            (out / "tokenizer_config.json").write_text(json.dumps(self.TOKENIZER_CONFIG, indent=1) + "\n")
        assert not (out / "tokenizer.json").exists()
        return out

    def fill(self, argv: list[str]) -> list[str]:
        return [re.sub(r"\{([^{}]*)\}", lambda m: self.get(m.group(1)), a) for a in argv]


# --- running --------------------------------------------------------------------------------------

def harness_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def environment(python: str = sys.executable) -> dict[str, Any]:
    """What runs: transformers (and whether it comes from the venv or an overlay on PYTHONPATH)."""
    code = ("import json, sys, transformers, torch\n"
            "def v(m):\n"
            "    try: return __import__(m).__version__\n"
            "    except Exception as e: return None\n"
            "print(json.dumps({'transformers': transformers.__version__, 'transformers_path': transformers.__file__,"
            " 'prefix': sys.prefix, 'python': sys.version.split()[0], 'torch': torch.__version__,"
            " 'tokenizers': v('tokenizers'), 'sentencepiece': v('sentencepiece'),"
            " 'protobuf': __import__('google.protobuf', fromlist=['x']).__version__, 'numpy': v('numpy'),"
            " 'peft': peft_version()}))\n")
    code = ("def peft_version():\n"
            "    from importlib.metadata import PackageNotFoundError, version\n"
            "    try: return version('peft')\n"
            "    except PackageNotFoundError: return None\n") + code
    r = subprocess.run([python, "-c", code], cwd=ROOT, env=harness_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot import transformers/torch with {python}:\n{r.stderr}")
    env = json.loads(r.stdout.strip().splitlines()[-1])
    site = Path(env["transformers_path"]).resolve().parent.parent
    env["overlay"] = None if Path(env["prefix"]).resolve() in site.parents else str(site)
    return env


TREE_PARTS = ("harness", "reference_model", "suites")


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return r.stdout if r.returncode == 0 else None


def harness_tree() -> dict[str, Any]:
    """Which harness ran: the git commit, the tracked files changed since (None without git), and a
    content hash of harness/, reference_model/ and suites/ (.py, .toml; not this catalogue)."""
    h = hashlib.sha256()
    files = sorted(p for part in TREE_PARTS for p in (ROOT / part).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".toml") and "__pycache__" not in p.parts
                   and p != SUITE_FILE)
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", *TREE_PARTS)
    dirty = None if status is None else sorted(
        line[3:] for line in status.splitlines() if line[3:] != str(SUITE_FILE.relative_to(ROOT)))
    return {"commit": commit.strip() if commit else None, "changed_files": dirty, "tree_sha256": h.hexdigest()}


def shown_command(argv: list[str]) -> str:
    """The harness command as a user types it, with placeholders left as names."""
    def q(a: str) -> str:
        return a if re.fullmatch(r"[\w{}./,=:+*-]+", a) else "'" + a.replace("'", "'\\''") + "'"
    return "llama-parity " + " ".join(q(a) for a in argv)


def prune(folder: Path) -> None:
    """Keep only report.md of what the harness wrote (its summaries are megabytes)."""
    for p in sorted(folder.rglob("*"), reverse=True):
        if p.is_file() and p.name != "report.md":
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def run_check(entry: dict[str, Any], role: str, version: str, out_root: Path, fixtures: Fixtures,
              env_info: dict[str, Any], shim: bool = True, python: str = sys.executable,
              tree: dict[str, Any] | None = None) -> dict[str, Any]:
    out = out_root / f"transformers-{version}" / entry["id"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = fixtures.fill(entry["argv"])
    # Its output is captured, not a terminal: no suite draws progress bars into it (only some take
    # --no-progress at all).
    cmd = [python, str(Path(__file__).resolve()), "harness" if shim else "harness-raw", *argv, "--out", str(out)]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=harness_env(), capture_output=True, text=True)
    seconds = round(time.time() - t0, 1)
    console = (r.stdout + r.stderr).splitlines()
    cells, subjects = read_cells(out), read_subjects(out)
    d = decide(entry, role, cells, r.returncode)
    verdict = {
        "id": entry["id"], "title": entry["title"], "role": role, "release": version,
        "peft": entry.get(f"{role}_peft"),
        "verdict": d["verdict"], "ok": d["ok"], "why": d["why"],
        "expected": "caught" if role == "bug" else "passes",
        "ok_kind": entry.get("ok_kind"), "pattern": entry["caught"], "scope": scope(entry["caught"]),
        "ok_accepts_na": entry.get("ok_accepts_na"),
        "harness_exit": r.returncode, "seconds": seconds,
        "command": shown_command(entry["argv"]) + " --out <this folder>",
        "argv": argv, "protobuf_shim": any(SHIM_MARK in line for line in console),
        "environment": {**env_info, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")},
        "harness": tree,
        "rows_in_scope": d["in_scope_counts"],
        "first_row": describe(d["rows"][0]) if d["rows"] else None,
        "subjects": subjects_of(d["rows"] or d["in_scope"], subjects),
        "rows": [slim(c) for c in d["rows"][:20]],
        "rows_total": len(d["rows"]),
        "console_tail": console[-15:],
    }
    prune(out)
    (out / "verdict.json").write_text(json.dumps(verdict, indent=1, default=str) + "\n", encoding="utf-8")
    with open(out / "matched.jsonl", "w", encoding="utf-8") as f:
        for c in d["in_scope"][:200]:
            f.write(json.dumps(slim(c), default=str) + "\n")
    return verdict


def interpreter() -> str:
    """The Python whose transformers is judged: $PYTHON (a venv's python), else this one."""
    return os.environ.get("PYTHON") or sys.executable


def cmd_run(a) -> int:
    data = load(Path(a.suite))
    python = interpreter()
    env_info = environment(python)
    version, peft = env_info["transformers"], env_info.get("peft")
    todo = checks_for(data, version, peft)
    waiting = waiting_for(data, version, peft)
    if a.only:
        todo = [(e, r) for e, r in todo if e["id"] in a.only]
        waiting = [(e, r) for e, r in waiting if e["id"] in a.only]
    where = f" (overlay {env_info['overlay']} on {env_info['prefix']})" if env_info["overlay"] else f" ({env_info['prefix']})"
    print(f"transformers {version}{where}, torch {env_info['torch']}, peft {peft or 'not installed'}")
    for e, role in waiting:
        print(f"- {e['id']} ({role}): not run here, it needs {pairing(e, role)} (peft {peft or 'not installed'} is)")
    if not todo:
        print(f"no museum entry runs on {version}; releases in the museum: {', '.join(releases(data))}")
        return 0
    print(f"{len(todo)} check(s) on {version}: " + ", ".join(f"{e['id']} ({r})" for e, r in todo))
    fixtures, bad, tree = Fixtures(python=python), 0, harness_tree()
    changed = f", {len(tree['changed_files'])} file(s) changed since" if tree["changed_files"] else ""
    print(f"harness {ROOT}: commit {tree['commit'] or '(no git)'}{changed}, tree sha256 {tree['tree_sha256'][:16]}")
    out_root = Path(a.out)
    for e, role in todo:
        on = f" (peft {e[f'{role}_peft']})" if f"{role}_peft" in e else ""
        print(f"- {e['id']}{on}: {'must catch' if role == 'bug' else 'must pass'} ... ", end="", flush=True)
        v = run_check(e, role, version, out_root, fixtures, env_info, shim=not a.no_protobuf_shim, python=python,
                      tree=tree)
        bad += not v["ok"]
        print(f"{v['verdict']} (harness exit {v['harness_exit']}, {v['seconds']}s"
              f"{', protobuf shim' if v['protobuf_shim'] else ''})")
        print(f"    {v['why']}" + (f"\n    {v['first_row']}" if v["first_row"] else ""))
    print(f"results: {out_root / f'transformers-{version}'}")
    return 1 if bad else 0


# --- merge ----------------------------------------------------------------------------------------

def collect(out_root: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for p in sorted(Path(out_root).glob("transformers-*/*/verdict.json")):
        v = json.loads(p.read_text(encoding="utf-8"))
        found[(v["id"], v["release"])] = v
    return found


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _source_links(sources: list[str]) -> str:
    out = []
    for s in sources:
        m = re.fullmatch(r"([\w.-]+/[\w.-]+)#(\d+)", s)
        short = s.replace("huggingface/transformers", "")
        out.append(f"[{short}](https://github.com/{m.group(1)}/issues/{m.group(2)})" if m else s)
    return ", ".join(out)


def render(data: dict[str, Any], found: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, int]:
    bad = 0
    lines = [
        "# The museum of real regressions",
        "",
        f"Catalogue `suites/history.toml` version {data['version']}; rendered by `python scripts/history.py merge` "
        "from the verdict.json files below (what each one ran, on which interpreter, is inside it). "
        "See [docs/history.md](../../docs/history.md).",
        "",
        "Each entry is a real transformers Llama bug. The harness command must **catch** it (a failing row that "
        "matches the entry's pattern) on the release that had it, and the **same command** must pass (no failing "
        "row in the pattern's scope, at least one passing) on the release without it.",
        "",
        "| entry | mechanism | source | bug release: caught? (row) | ok release: passes? | harness command |",
        "|---|---|---|---|---|---|",
    ]
    for e in in_scope(data):
        cells = []
        for role in ("bug", "ok"):
            rel = e[f"{role}_release"]
            v = found.get((e["id"], rel))
            if v is None:
                bad += 1
                cells.append(f"{pairing(e, role)}: **not run**")
                continue
            bad += not v["ok"]
            mark = "yes" if v["ok"] else "**NO**"
            link = f"[{v['verdict']}](transformers-{rel}/{e['id']}/verdict.json)"
            kind = "" if role == "bug" else f" ({e['ok_kind']})"
            first = describe(v["rows"][0]) if v.get("rows") else v.get("first_row")
            row = f"<br>`{_md(first)}`" if first else ""
            if role == "ok":
                row = f"<br>{_md(v['why'])}{row}"
            cells.append(f"{pairing(e, role)}{kind}: {mark}, {link}{row}")
        lines.append(f"| **{e['id']}**<br>{_md(e['title'])} | {_md(e['mechanism'])} | {_source_links(e['source'])} | "
                     f"{cells[0]} | {cells[1]} | `{_md(shown_command(e['argv']))}` |")
    out_of = [e for e in data["entry"] if not e.get("in_scope", True)]
    if out_of:
        lines += ["", "## Listed, not run (outside Llama 2's scope)", "",
                  "| entry | mechanism | source | affected | why not run |", "|---|---|---|---|---|"]
        for e in out_of:
            lines.append(f"| **{e['id']}**<br>{_md(e['title'])} | {_md(e['mechanism'])} | {_source_links(e['source'])} | "
                         f"`{_md(e['affected'])}` | {_md(e['out_of_scope_reason'])} |")
    lines += ["", "## Runs", "", "| release | interpreter | transformers from | protobuf shim | harness tree | checks | seconds |",
              "|---|---|---|---|---|---|---|"]
    by_release: dict[str, list[dict[str, Any]]] = {}
    for (_, rel), v in found.items():
        by_release.setdefault(rel, []).append(v)
    runs: list[tuple[str, list[dict[str, Any]]]] = []
    for rel in sorted(by_release, key=lambda r: tuple(int(x) for x in r.split("."))):
        groups: dict[tuple, list[dict[str, Any]]] = {}   # checks of one release run apart: one line each
        for v in by_release[rel]:
            env, tree = v["environment"], v.get("harness") or {}
            key = (env.get("prefix"), env.get("overlay"), tree.get("tree_sha256"), tree.get("commit"))
            groups.setdefault(key, []).append(v)
        runs += [(rel, vs) for vs in groups.values()]
    for rel, vs in runs:
        env = vs[0]["environment"]
        src = f"overlay `{env['overlay']}`" if env.get("overlay") else "the venv"
        tree = vs[0].get("harness") or {}
        tree_text = (f"`{tree.get('tree_sha256', '?')[:12]}`" + (f" (commit {tree['commit'][:7]})" if tree.get("commit") else "")
                     + (f", {len(tree['changed_files'])} changed" if tree.get("changed_files") else ""))
        with_peft = f" + peft {env['peft']}" if env.get("peft") else ""
        lines.append(f"| {rel}{with_peft} | `{env['prefix']}` | {src} | {'yes' if any(v['protobuf_shim'] for v in vs) else 'no'} | "
                     f"{tree_text} | "
                     f"{', '.join(sorted(v['id'] + ' (' + v['role'] + ')' for v in vs))} | "
                     f"{sum(v['seconds'] for v in vs):.0f} |")
    lines += ["", f"Verdict: **{'every entry caught on its bug release and passing on its ok release' if not bad else f'{bad} check(s) missing or wrong'}**.", ""]
    return "\n".join(lines), bad


def cmd_merge(a) -> int:
    data = load(Path(a.suite))
    out_root = Path(a.out)
    found = collect(out_root)
    text, bad = render(data, found)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "README.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out_root / 'README.md'}")
    return 1 if bad else 0


def cmd_list(a) -> int:
    data = load(Path(a.suite))
    for e in data["entry"]:
        if e.get("in_scope", True):
            print(f"{e['id']}: catch on {pairing(e, 'bug')}, pass on {pairing(e, 'ok')} ({e['ok_kind']}): "
                  f"{shown_command(e['argv'])}")
        else:
            print(f"{e['id']}: not run ({e['out_of_scope_reason']})")
    print("releases: " + " ".join(releases(data)))
    return 0


# --- the harness, with the protobuf shim ------------------------------------------------------------

def protobuf_conflict() -> str | None:
    """Whether loading transformers' sentencepiece_model_pb2 after sentencepiece's raises here."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (what the harness imports first)
        import transformers.convert_slow_tokenizer as conv
    except Exception:
        return None
    try:
        if hasattr(conv, "import_protobuf"):
            conv.import_protobuf()
        else:
            from transformers.utils import sentencepiece_model_pb2  # noqa: F401
    except Exception as e:   # noqa: BLE001 - any failure here is the conflict the shim removes
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def apply_shim() -> None:
    conflict = protobuf_conflict()
    if conflict is None:
        return
    from sentencepiece import sentencepiece_model_pb2 as pb
    for name in ("transformers.utils.sentencepiece_model_pb2", "transformers.utils.sentencepiece_model_pb2_new"):
        sys.modules[name] = pb
    print(f"{SHIM_MARK}: transformers' sentencepiece_model_pb2 conflicts with sentencepiece's ({conflict}); "
          "transformers now uses sentencepiece's module", file=sys.stderr, flush=True)


def cmd_harness(args: list[str], shim: bool) -> int:
    import runpy
    sys.path.insert(0, str(ROOT))
    if shim and args[:1] == ["tokenizer"]:    # only the tokenizer suite reads the sentencepiece proto
        apply_shim()
    sys.argv = ["llama-parity", *args]
    try:
        runpy.run_module("harness", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("harness", "harness-raw"):
        return cmd_harness(argv[1:], shim=argv[0] == "harness")
    p = argparse.ArgumentParser(prog="scripts/history.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=str(SUITE_FILE), help="the catalogue (default: suites/history.toml)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the entries of the installed transformers release")
    r.add_argument("--out", default=str(DEFAULT_OUT))
    r.add_argument("--only", type=lambda s: s.split(","), help="comma list of entry ids")
    r.add_argument("--no-protobuf-shim", action="store_true",
                   help="run the harness as it is (tokenizers that read the sentencepiece proto become n/a on 4.x)")
    m = sub.add_parser("merge", help="render OUT/README.md from every verdict.json")
    m.add_argument("--out", default=str(DEFAULT_OUT))
    sub.add_parser("list", help="the entries and the releases they need")
    sub.add_parser("harness", help="the harness CLI with the protobuf shim (arguments go to llama-parity)")
    a = p.parse_args(argv)
    try:
        return {"run": cmd_run, "merge": cmd_merge, "list": cmd_list}[a.cmd](a)
    except CatalogueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

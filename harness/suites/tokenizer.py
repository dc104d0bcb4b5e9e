"""The tokenizer suite: every tokenizer we can load vs sentencepiece on the same tokenizer.model.

Subjects (found at run time; what the installed transformers lacks is a row with status n/a and
the reason, never a silent skip):
  reference                             reference_model/tokenizer.py (no sentencepiece inside)
  transformers.LlamaTokenizer           4.x: the sentencepiece-backed slow class; 5.x: tokenizers-backed
  transformers.LlamaTokenizerFast       tokenizers-backed (5.x: an alias of LlamaTokenizer)
  transformers.SentencePieceBackend     5.x: the generic sentencepiece-backed base class
  transformers.AutoTokenizer            what a folder with only tokenizer.model resolves to
each loaded from the bare file (``vocab_file=``), from a folder holding only tokenizer.model
(``from_pretrained``, with the legacy / add_prefix_space / from_slow flags), and from the folder
that ``save_pretrained`` writes.

Checks (catalogue: suites/tokenizer/cases.toml): encode, encode with the subject's default special
tokens, decode, round trip, batch encode/decode, padding (transformers only), a hypothesis fuzz
over random Unicode, a sweep over every vocabulary id, and a sweep over code points by Unicode
class. Each row is one check x subject; a divergence carries the text, both id lists and both
piece lists in ``extra``. Known, deliberate upstream differences (the catalogue's [[known]]) get
status "info" with reason "known divergence: ...": still counted, still shown, not gated.
"""
from __future__ import annotations

import fnmatch
import shutil
import sys
import tempfile
import time
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.core import SUITES
from harness.core.errors import InputError
from harness.core.store import FAIL, INFO, NA, PASS, Row, exit_code, write_results

SUITE = "tokenizer"
AGAINST = "sentencepiece"
CASES_FILE = SUITES / "tokenizer" / "cases.toml"
DEFAULT_FUZZ_EXAMPLES = 300
MAX_EVIDENCE = 8            # divergences kept per row (the count is complete)


# --- the catalogue --------------------------------------------------------------------------------

@dataclass
class Catalogue:
    version: str
    encode: list[dict[str, Any]]
    decode: list[dict[str, Any]]
    batch: list[dict[str, Any]]
    padding: list[dict[str, Any]]
    known: list[dict[str, str]]

    def known_reason(self, subject: str, case: str, metric: str) -> str | None:
        for k in self.known:
            if (fnmatch.fnmatchcase(subject, k["subjects"]) and fnmatch.fnmatchcase(case, k["cases"])
                    and fnmatch.fnmatchcase(metric, k.get("metrics", "*"))):
                return k["reason"]
        return None


def load_catalogue(path: Path = CASES_FILE) -> Catalogue:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read the tokenizer catalogue ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    enc = []
    for c in data.get("encode", []):
        if "name" not in c or not isinstance(c.get("text"), str):
            raise InputError(f"{path}: an [[encode]] case needs a name and a text: {c!r}")
        enc.append({**c, "text": c["text"] * int(c.get("repeat", 1))})
    for c in data.get("decode", []):
        if "name" not in c or ("ids" in c) == ("pieces" in c):
            raise InputError(f"{path}: a [[decode]] case needs a name and exactly one of ids/pieces: {c!r}")
    for k in data.get("known", []):
        if not all(isinstance(k.get(f), str) for f in ("subjects", "cases", "reason")):
            raise InputError(f"{path}: a [[known]] entry needs subjects, cases and reason: {k!r}")
    names = [c["name"] for kind in ("encode", "decode", "batch", "padding") for c in data.get(kind, [])]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{path}: case names repeat: {', '.join(dupes)}")
    return Catalogue(str(data.get("version", "")), enc, list(data.get("decode", [])),
                     list(data.get("batch", [])), list(data.get("padding", [])), list(data.get("known", [])))


# --- subjects -------------------------------------------------------------------------------------

@dataclass
class Subject:
    name: str                                      # e.g. "transformers.LlamaTokenizer"
    loader: str                                    # "vocab_file", "from_pretrained", "saved", "model_path"
    flags: str = ""                                # e.g. "legacy=True"
    encode: Callable[[str], list[int]] | None = None
    encode_special: Callable[[str], list[int]] | None = None
    decode: Callable[[list[int]], str] | None = None
    batch_encode: Callable[[list[str]], list[list[int]]] | None = None
    batch_decode: Callable[[list[list[int]]], list[str]] | None = None
    pieces: Callable[[list[int]], list[str]] | None = None
    hf: Any = None                                 # the transformers object, for padding
    na: str | None = None                          # why it cannot be run here
    make: Callable[[], Any] | None = None          # builds the tokenizer (load_subject)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What [[known]] and --subjects patterns match: name/loader[/flags]."""
        return "/".join(x for x in (self.name, self.loader, self.flags) if x)

    def case(self, kind: str, name: str) -> dict[str, Any]:
        return {"kind": kind, "case": name, "loader": self.loader, "flags": self.flags}


def _reference_subject(model: Path) -> Subject:
    def make() -> Any:
        from reference_model.tokenizer import Tokenizer
        return Tokenizer(model)
    return Subject("reference", "model_path", make=make)


def _hf_subject(name: str, loader: str, flags: str, make: Callable[[], Any]) -> Subject:
    return Subject(name, loader, flags, make=make)


def load_subject(s: Subject) -> Subject:
    """Build the tokenizer behind a subject (only the subjects a run selects are ever built)."""
    if s.na or s.encode is not None or s.make is None:
        return s
    try:
        tk = s.make()
    except Exception as e:    # a loader that fails here is a finding, reported as n/a with the error
        s.na = f"loading failed: {type(e).__name__}: {str(e)[:300]}"
        return s
    if s.name == "reference":
        s.encode = lambda t: tk.encode(t, bos=False, eos=False)
        s.encode_special = lambda t: tk.encode(t, bos=True, eos=False)
        s.decode = tk.decode
        s.batch_encode = lambda texts: [tk.encode(t, bos=False, eos=False) for t in texts]
        s.batch_decode = lambda batch: [tk.decode(ids) for ids in batch]
        s.pieces = lambda ids: [tk.id_to_piece(i) for i in ids]
        s.info["class"] = "reference_model.tokenizer.Tokenizer"
        return s
    s.encode = lambda t: list(tk.encode(t, add_special_tokens=False))
    s.encode_special = lambda t: list(tk.encode(t))
    s.decode = lambda ids: tk.decode(ids, skip_special_tokens=True)
    s.batch_encode = lambda texts: [list(x) for x in tk(texts, add_special_tokens=False)["input_ids"]]
    s.batch_decode = lambda batch: list(tk.batch_decode(batch, skip_special_tokens=True))
    s.pieces = lambda ids: list(tk.convert_ids_to_tokens(ids))
    s.hf = tk
    s.info.update({"class": f"{type(tk).__module__}.{type(tk).__qualname__}", "vocab_size": len(tk)})
    return s


def _is_slow(cls: type) -> bool:
    names = {c.__name__ for c in cls.__mro__}
    return "PreTrainedTokenizer" in names and not names & {"PreTrainedTokenizerFast", "TokenizersBackend"}


def discover_subjects(model: Path, workdir: Path) -> list[Subject]:
    """The reference plus every transformers tokenizer/loader/flag combination the installed release has."""
    subjects = [_reference_subject(model)]
    try:
        import transformers
    except ImportError as e:
        return subjects + [Subject("transformers", "-", na=f"transformers not importable: {e}")]
    bare = workdir / "bare"                       # a folder holding only tokenizer.model
    bare.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, bare / "tokenizer.model")
    major = int(transformers.__version__.split(".")[0])
    flag_sets = [("", {}), ("legacy=True", {"legacy": True}), ("legacy=False", {"legacy": False}),
                 ("add_prefix_space=True", {"add_prefix_space": True}),
                 ("add_prefix_space=False", {"add_prefix_space": False})]

    llama = getattr(transformers, "LlamaTokenizer", None)
    fast = getattr(transformers, "LlamaTokenizerFast", None)
    for cls_name, cls in (("LlamaTokenizer", llama), ("LlamaTokenizerFast", fast)):
        name = f"transformers.{cls_name}"
        if cls is None:
            subjects.append(Subject(name, "-", na=f"transformers {transformers.__version__} has no {cls_name}"))
            continue
        if cls_name == "LlamaTokenizer" and not _is_slow(cls):
            subjects.append(Subject(name + "(sentencepiece)", "-", na=(
                f"transformers {transformers.__version__} removed the sentencepiece-backed slow "
                f"LlamaTokenizer: LlamaTokenizer is {cls.__mro__[1].__name__}-based (tested below)")))
        alias = cls_name == "LlamaTokenizerFast" and fast is llama
        flag_list = flag_sets[:1] if alias else flag_sets
        if cls_name == "LlamaTokenizerFast" or not _is_slow(cls):
            flag_list = flag_list + ([] if alias else [("from_slow=True", {"from_slow": True})])
        subjects.append(_hf_subject(name, "vocab_file", "",
                                    lambda cls=cls: cls(vocab_file=str(model))))
        for flags, kw in flag_list:
            s = _hf_subject(name, "from_pretrained", flags,
                            lambda cls=cls, kw=kw: cls.from_pretrained(str(bare), **kw))
            if alias:
                s.info["alias_of"] = "transformers.LlamaTokenizer"
            subjects.append(s)
        saved = workdir / f"saved-{cls_name}"

        def save_and_reload(cls=cls, saved=saved):
            cls.from_pretrained(str(bare)).save_pretrained(str(saved))
            return cls.from_pretrained(str(saved))
        subjects.append(_hf_subject(name, "saved", "", save_and_reload))

    sp_backend = getattr(transformers, "SentencePieceBackend", None)
    if sp_backend is None:
        subjects.append(Subject("transformers.SentencePieceBackend", "-", na=(
            f"transformers {transformers.__version__} has no SentencePieceBackend (5.x only); "
            "its sentencepiece path is the slow LlamaTokenizer")))
    else:
        subjects.append(_hf_subject("transformers.SentencePieceBackend", "vocab_file", "",
                                    lambda: sp_backend(vocab_file=str(model))))
    auto = transformers.AutoTokenizer
    subjects.append(_hf_subject("transformers.AutoTokenizer", "from_pretrained", "",
                                lambda: auto.from_pretrained(str(bare))))
    if major < 5:
        subjects.append(_hf_subject("transformers.AutoTokenizer", "from_pretrained", "use_fast=False",
                                    lambda: auto.from_pretrained(str(bare), use_fast=False)))
    return subjects


# --- comparison helpers ---------------------------------------------------------------------------

class Truth:
    """sentencepiece on the same file: the ground truth."""

    def __init__(self, model: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(model))
        self.n = self.sp.get_piece_size()

    def encode(self, s: str) -> list[int]:
        return list(self.sp.encode(s))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) if 0 <= i < self.n else f"<id {i}>" for i in ids]


def _safe(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    try:
        return fn(*args), None
    except Exception as e:   # a subject that raises is a divergence with the error as evidence
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def _first_diff(a: Any, b: Any) -> int | None:
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a or [], b or [])):
        if x != y:
            return i
    return min(len(a or []), len(b or []))


def _evidence(truth: Truth, subject: Subject, text: str | None, want: Any, got: Any,
              error: str | None = None, **more: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {}
    if text is not None:
        ev["text"] = text if len(text) <= 400 else text[:400] + f"... ({len(text)} chars)"
    ev["expected"], ev["got"] = _clip(want), _clip(got)
    if isinstance(want, list) and all(isinstance(i, int) for i in want):
        ev["expected_pieces"] = _clip(truth.pieces(want))
    if isinstance(got, list) and all(isinstance(i, int) for i in got) and subject.pieces:
        ev["got_pieces"] = _clip(_safe(subject.pieces, got)[0])
    if isinstance(want, (list, str)) and isinstance(got, (list, str)):
        ev["first_difference_at"] = _first_diff(want, got)
    if error:
        ev["error"] = error
    ev.update(more)
    return ev


def _clip(x: Any, n: int = 200) -> Any:
    if isinstance(x, list) and len(x) > n:
        return x[:n] + [f"... {len(x) - n} more"]
    if isinstance(x, str) and len(x) > 4 * n:
        return x[: 4 * n] + f"... ({len(x)} chars)"
    return x


class Judge:
    """Turns (subject, case, metric, equal?) into rows, applying the catalogue's known list."""

    def __init__(self, cat: Catalogue):
        self.cat, self.rows = cat, []

    def add(self, subject: Subject, kind: str, case: str, metric: str, mismatches: int,
            total: int = 1, evidence: list[dict[str, Any]] | None = None, note: str = "") -> None:
        known = self.cat.known_reason(subject.label, case, metric)
        if mismatches == 0:
            status = PASS
            reason = note or ("equal" if total == 1 else f"all {total} equal")
            if known:
                reason += "; marked known in the catalogue but no longer diverges"
        elif known:
            status, reason = INFO, f"known divergence: {known}"
        else:
            status = FAIL
            reason = f"{mismatches} of {total} differ from sentencepiece" if total > 1 else "differs from sentencepiece"
        extra: dict[str, Any] = {}
        if evidence:
            extra["divergences"] = evidence[:MAX_EVIDENCE]
        self.rows.append(Row(SUITE, subject.case(kind, case), subject.name, AGAINST, metric,
                             float(mismatches), 0.0, status, reason, extra))


# --- the checks -----------------------------------------------------------------------------------

def check_encode(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    text, name = case["text"], case["name"]
    want = truth.encode(text)
    got, err = _safe(s.encode, text)
    j.add(s, "encode", name, "encode", int(got != want),
          evidence=[_evidence(truth, s, text, want, got, err)] if got != want else None)
    bos = truth.sp.bos_id()
    want_sp = [bos] + want
    got_sp, err = _safe(s.encode_special, text)
    j.add(s, "encode", name, "encode_special", int(got_sp != want_sp),
          evidence=[_evidence(truth, s, text, want_sp, got_sp, err,
                              rule="default special tokens vs Meta's encode(bos=True, eos=False)")]
          if got_sp != want_sp else None)
    want_rt = truth.decode(want)
    got_rt, err = (None, err) if got is None else _safe(s.decode, got)
    j.add(s, "encode", name, "roundtrip", int(got_rt != want_rt),
          evidence=[_evidence(truth, s, text, want_rt, got_rt, err,
                              sentencepiece_roundtrip_is_identity=want_rt == text)]
          if got_rt != want_rt else None)


def check_decode(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    ids = case["ids"] if "ids" in case else [truth.sp.piece_to_id(p) for p in case["pieces"]]
    want = truth.decode(ids)
    got, err = _safe(s.decode, ids)
    j.add(s, "decode", case["name"], "decode", int(got != want),
          evidence=[_evidence(truth, s, None, want, got, err, ids=ids, pieces=truth.pieces(ids))]
          if got != want else None)


def check_batch(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    texts = case["texts"]
    want = [truth.encode(t) for t in texts]
    got, err = _safe(s.batch_encode, texts)
    bad = [i for i in range(len(texts)) if got is None or got[i] != want[i]]
    j.add(s, "batch", case["name"], "batch_encode", len(bad), len(texts),
          [_evidence(truth, s, texts[i], want[i], None if got is None else got[i], err) for i in bad])
    want_d = [truth.decode(ids) for ids in want]
    got_d, err = _safe(s.batch_decode, want)
    bad = [i for i in range(len(texts)) if got_d is None or got_d[i] != want_d[i]]
    j.add(s, "batch", case["name"], "batch_decode", len(bad), len(texts),
          [_evidence(truth, s, texts[i], want_d[i], None if got_d is None else got_d[i], err) for i in bad])


def check_padding(j: Judge, truth: Truth, s: Subject, case: dict[str, Any]) -> None:
    """Add <pad> the transformers way, pad a batch left/right: real tokens and masks must be exact."""
    metrics = ("pad_unchanged_encodings", "pad_real_tokens", "pad_mask")
    if s.hf is None:
        for m in metrics:
            j.rows.append(Row(SUITE, s.case("padding", case["name"]), s.name, AGAINST, m, None, None, NA,
                              "Meta's tokenizer has no pad token (pad_id -1): padding is the caller's job"))
        return
    import copy
    texts, side = case["texts"], case["side"]
    try:
        tk = copy.deepcopy(s.hf)
        before = [list(tk.encode(t)) for t in texts]
        tk.add_special_tokens({"pad_token": "<pad>"})
        tk.padding_side = side
        after = [list(tk.encode(t)) for t in texts]
        batch = tk(texts, padding=True)
    except Exception as e:
        for m in metrics:
            j.add(s, "padding", case["name"], m, 1, evidence=[{"error": f"{type(e).__name__}: {e}"}])
        return
    pad_id = tk.pad_token_id
    bad_unchanged = [i for i in range(len(texts)) if before[i] != after[i]]
    j.add(s, "padding", case["name"], "pad_unchanged_encodings", len(bad_unchanged), len(texts),
          [_evidence(truth, s, texts[i], before[i], after[i], rule="encode before vs after adding <pad>")
           for i in bad_unchanged])
    bad_real, bad_mask = [], []
    width = max(len(x) for x in before)
    for i, text in enumerate(texts):
        ids, mask = list(batch["input_ids"][i]), list(batch["attention_mask"][i])
        n = len(before[i])
        want_mask = [1] * n + [0] * (width - n) if side == "right" else [0] * (width - n) + [1] * n
        want_ids = (before[i] + [pad_id] * (width - n) if side == "right"
                    else [pad_id] * (width - n) + before[i])
        real = [t for t, m in zip(ids, mask) if m]
        if real != before[i] or ids != want_ids:
            bad_real.append(_evidence(truth, s, text, want_ids, ids, pad_id=pad_id, side=side))
        if mask != want_mask:
            bad_mask.append(_evidence(truth, s, text, want_mask, mask, side=side))
    j.add(s, "padding", case["name"], "pad_real_tokens", len(bad_real), len(texts), bad_real,
          note=f"pad id {pad_id}, {side} padding")
    j.add(s, "padding", case["name"], "pad_mask", len(bad_mask), len(texts), bad_mask)


def fuzz_texts(n: int) -> list[str]:
    """n random Unicode strings from hypothesis, derandomised: the same list on every run."""
    if n <= 0:
        return []
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    pieces = st.one_of(
        st.text(max_size=12),                                            # any code point but surrogates
        st.text(alphabet=" \t\n\r\u00a0\u3000▁", max_size=6),            # whitespace, incl. '▁' itself
        st.sampled_from(["<s>", "</s>", "<unk>", "<0x41>", "▁", "  ", "Hello", " world", "123", "🦙",
                         "\u200d", "e\u0301", "𠀀", "\ufffd", "\x00"]),
        st.text(alphabet=st.characters(codec="ascii"), max_size=12),
    )
    strategy = st.lists(pieces, max_size=6).map("".join)
    out: list[str] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(text: str) -> None:
        out.append(text)

    collect()
    seen, unique = set(), []
    for t in out:                     # hypothesis may call twice with one value; keep the first
        if t not in seen:
            seen.add(t)
            unique.append(t)
    return unique


def check_fuzz(j: Judge, truth: Truth, s: Subject, texts: list[str]) -> None:
    """Texts holding a special-token string (<s>, </s>, <unk>) are judged apart, as fuzz-special."""
    special = [truth.sp.id_to_piece(i) for i in range(truth.n) if truth.sp.is_control(i) or truth.sp.is_unknown(i)]
    plain = [t for t in texts if not any(p in t for p in special)]
    with_special = [t for t in texts if any(p in t for p in special)]
    _fuzz(j, truth, s, plain, "fuzz")
    _fuzz(j, truth, s, with_special, "fuzz-special")


def _fuzz(j: Judge, truth: Truth, s: Subject, texts: list[str], name: str) -> None:
    want = [truth.encode(t) for t in texts]
    if s.batch_encode is not None and s.hf is not None:
        got_all, err = _safe(s.batch_encode, texts)
    else:
        got_all, err = None, "unbatched"
    ev_enc, ev_rt = [], []
    n_enc = n_rt = 0
    for i, t in enumerate(texts):
        got, e = (got_all[i], None) if got_all is not None else _safe(s.encode, t)
        if got != want[i]:
            n_enc += 1
            if len(ev_enc) < MAX_EVIDENCE:
                ev_enc.append(_evidence(truth, s, t, want[i], got, e))
        want_rt = truth.decode(want[i])
        got_rt, e = (None, e) if got is None else _safe(s.decode, got)
        if got_rt != want_rt:
            n_rt += 1
            if len(ev_rt) < MAX_EVIDENCE:
                ev_rt.append(_evidence(truth, s, t, want_rt, got_rt, e))
    j.add(s, "fuzz", name, "fuzz_encode", n_enc, len(texts), ev_enc)
    j.add(s, "fuzz", name, "fuzz_roundtrip", n_rt, len(texts), ev_rt)


def check_vocab(j: Judge, truth: Truth, s: Subject) -> None:
    """Decode every id alone; encode the text of every NORMAL piece."""
    n = truth.n
    want = [truth.decode([i]) for i in range(n)]
    if s.batch_decode is not None:
        got, err = _safe(s.batch_decode, [[i] for i in range(n)])
    else:
        got, err = None, "no batch decode"
    bad = [i for i in range(n) if got is None or got[i] != want[i]]
    j.add(s, "vocab", "every-id", "vocab_decode", len(bad), n,
          [_evidence(truth, s, None, want[i], None if got is None else got[i], err, id=i,
                     piece=truth.sp.id_to_piece(i)) for i in bad[:MAX_EVIDENCE]])
    normal = [i for i in range(n) if not (truth.sp.is_control(i) or truth.sp.is_unknown(i) or truth.sp.is_byte(i))]
    texts = [truth.sp.id_to_piece(i).replace("▁", " ") for i in normal]
    want_e = [truth.encode(t) for t in texts]
    got_e, err = _safe(s.batch_encode, texts)
    bad = [k for k in range(len(texts)) if got_e is None or got_e[k] != want_e[k]]
    j.add(s, "vocab", "every-normal-piece", "vocab_encode", len(bad), len(texts),
          [_evidence(truth, s, texts[k], want_e[k], None if got_e is None else got_e[k], err, id=normal[k])
           for k in bad[:MAX_EVIDENCE]])


def codepoint_classes(step: int = 97) -> dict[str, list[str]]:
    """Every step-th Unicode scalar value (no surrogates), grouped by major general category."""
    groups: dict[str, list[str]] = {}
    for cp in range(0, 0x110000, step):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        groups.setdefault(unicodedata.category(c)[0], []).append(c)
    return dict(sorted(groups.items()))


def check_codepoints(j: Judge, truth: Truth, s: Subject, groups: dict[str, list[str]]) -> None:
    for cls, chars in groups.items():
        texts = [f"{c}" for c in chars] + [f"a{c} {c}b" for c in chars]
        want = [truth.encode(t) for t in texts]
        got, err = _safe(s.batch_encode, texts)
        bad = [k for k in range(len(texts)) if got is None or got[k] != want[k]]
        j.add(s, "codepoints", f"category-{cls}", "codepoint_encode", len(bad), len(texts),
              [_evidence(truth, s, texts[k], want[k], None if got is None else got[k], err,
                         codepoint=f"U+{ord(texts[k][0] if k < len(chars) else texts[k][1]):04X}")
               for k in bad[:MAX_EVIDENCE]])


# --- the run --------------------------------------------------------------------------------------

def _check_model_file(path: Path) -> None:
    """Bad input is exit 2 with the file named: missing, unreadable, not a SentencePiece BPE model."""
    from reference_model.tokenizer import Tokenizer, TokenizerFileError
    if not path.exists():
        raise InputError(f"--tokenizer: {path}: no such file")
    if not path.is_file():
        raise InputError(f"--tokenizer: {path}: not a file")
    try:
        Tokenizer(path)
    except TokenizerFileError as e:
        raise InputError(f"--tokenizer: {e}") from None
    except OSError as e:
        raise InputError(f"--tokenizer: {path}: {e.strerror}") from None
    try:
        import sentencepiece as spm
        spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise InputError(f"--tokenizer: {path}: sentencepiece cannot load it ({e})") from None


def run_tokenizer_suite(tokenizer_path: Path | None, out_dir: Path,
                        fuzz_examples: int = DEFAULT_FUZZ_EXAMPLES,
                        subjects: list[str] | None = None, cases_file: Path | None = None,
                        codepoint_step: int = 97, vocab_sweep: bool = True,
                        progress: bool = True) -> int:
    """Run the suite; write results.csv / summary.json / report.md into out_dir. 0 pass, 1 fail.

    tokenizer_path None: the built Llama 2 fixture (harness.fixtures.ensure_tokenizer_model).
    subjects: fnmatch patterns over subject labels (e.g. "reference", "transformers.Llama*");
    None runs all. Raises InputError for bad input (missing file, not a SentencePiece model).
    """
    from harness.core.environment import environment
    from harness.core.real_tokenizer import ensure_tokenizer_model
    started = time.time()
    if tokenizer_path is None:
        tokenizer_path = ensure_tokenizer_model()
    tokenizer_path = Path(tokenizer_path)
    _check_model_file(tokenizer_path)
    cat = load_catalogue(cases_file or CASES_FILE)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out: {out_dir}: exists and is not a folder")
    truth = Truth(tokenizer_path)
    log = (lambda msg: print(f"[tokenizer] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    judge = Judge(cat)
    texts = fuzz_texts(fuzz_examples)
    groups = codepoint_classes(codepoint_step)
    with tempfile.TemporaryDirectory(prefix="llama-parity-tok-") as tmp:
        found = discover_subjects(tokenizer_path, Path(tmp))
        if subjects:
            found = [s for s in found if any(fnmatch.fnmatchcase(s.label, p) or fnmatch.fnmatchcase(s.name, p)
                                             for p in subjects)]
            if not found:
                raise InputError(f"--subjects: {','.join(subjects)}: matches no subject")
        for s in found:
            load_subject(s)
            if s.na:
                judge.rows.append(Row(SUITE, s.case("subject", "-"), s.name, AGAINST, "available",
                                      None, None, NA, s.na))
                log(f"{s.label}: n/a ({s.na[:100]})")
                continue
            t0 = time.time()
            for c in cat.encode:
                check_encode(judge, truth, s, c)
            for c in cat.decode:
                check_decode(judge, truth, s, c)
            for c in cat.batch:
                check_batch(judge, truth, s, c)
            for c in cat.padding:
                check_padding(judge, truth, s, c)
            if texts:
                check_fuzz(judge, truth, s, texts)
            if vocab_sweep:
                check_vocab(judge, truth, s)
            if groups:
                check_codepoints(judge, truth, s, groups)
            mine = [r for r in judge.rows if r.subject == s.name and r.case.get("loader") == s.loader
                    and r.case.get("flags") == s.flags]
            log(f"{s.label}: {sum(r.status == FAIL for r in mine)} fail, "
                f"{sum(r.status == INFO for r in mine)} known, {sum(r.status == PASS for r in mine)} pass "
                f"({time.time() - t0:.1f}s)")
    import sentencepiece
    rows = judge.rows
    extra = {
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": _sha256(tokenizer_path),
        "catalogue": {"file": str(cases_file or CASES_FILE), "version": cat.version},
        "ground_truth": f"sentencepiece {getattr(sentencepiece, '__version__', '?')}",
        "fuzz_examples": len(texts),
        "codepoint_step": codepoint_step,
        "subjects": [{"subject": s.name, "loader": s.loader, "flags": s.flags,
                      **({"n/a": s.na} if s.na else {}), **s.info} for s in found],
        "known_divergences": sum(r.status == INFO for r in rows),
        "divergent_subjects": sorted({"/".join(x for x in (r.subject, r.case.get("loader"), r.case.get("flags")) if x)
                                      for r in rows if r.status == FAIL}),
    }
    summary = write_results(out_dir, SUITE, rows, environment("cpu"), extra,
                            timing={"seconds": round(time.time() - started, 1)})
    _write_markdown(out_dir / "report.md", summary, rows)
    c = summary["counts"]
    log(f"verdict {summary['verdict']}: {c['fail']} fail, {c['info']} known, {c['pass']} pass, "
        f"{c['n/a']} n/a; results in {out_dir}")
    return exit_code(rows)


def _sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _md(text: Any) -> str:
    """Escape a string from a tokenizer for a Markdown table cell."""
    s = repr(text) if not isinstance(text, str) else text
    for ch in "\\`*_{}[]<>()#+-.!|":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _write_markdown(path: Path, summary: dict[str, Any], rows: list[Row]) -> None:
    from harness.core.store import atomic_write_text
    lines = [f"# Tokenizer parity: {summary['verdict']}", "",
             f"Ground truth: {summary['ground_truth']} on `{summary['tokenizer_sha256'][:16]}`; "
             f"counts: {summary['counts']}", "", "## Per subject", "",
             "| subject | loader | flags | fail | known | pass | n/a |", "|---|---|---|---|---|---|---|"]
    keys: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        keys.setdefault((r.subject, str(r.case.get("loader")), str(r.case.get("flags"))), []).append(r)
    for (subj, loader, flags), rs in keys.items():
        lines.append(f"| {_md(subj)} | {_md(loader)} | {_md(flags)} | {sum(r.status == FAIL for r in rs)} | "
                     f"{sum(r.status == INFO for r in rs)} | {sum(r.status == PASS for r in rs)} | "
                     f"{sum(r.status == NA for r in rs)} |")
    lines += ["", "## Divergences (first evidence per failing or known cell)", ""]
    for r in rows:
        if r.status in (FAIL, INFO) and r.extra.get("divergences"):
            ev = r.extra["divergences"][0]
            lines.append(f"- **{r.status}** {_md(r.subject)} \\[{_md(r.case.get('loader'))},"
                         f"{_md(r.case.get('flags'))}\\] {_md(r.case.get('case'))} {_md(r.metric)}: "
                         f"text {_md(ev.get('text'))}; expected {_md(ev.get('expected'))} "
                         f"{_md(ev.get('expected_pieces', ''))}; got {_md(ev.get('got'))} "
                         f"{_md(ev.get('got_pieces', ''))}; {_md(r.reason)}")
    for r in rows:
        if r.status == NA:
            lines.append(f"- **n/a** {_md(r.subject)}: {_md(r.reason)}")
    atomic_write_text(path, "\n".join(lines) + "\n")

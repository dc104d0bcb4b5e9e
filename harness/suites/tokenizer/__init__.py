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

Checks (catalogue: suites/tokenizer.toml): encode, encode with the subject's default special
tokens, decode, round trip, batch encode/decode, padding (transformers only), a hypothesis fuzz
over random Unicode, a sweep over every vocabulary id, and a sweep over code points by Unicode
class. Each row is one check x subject; a divergence carries the text, both id lists and both
piece lists in ``extra``. Known, deliberate upstream differences (the catalogue's [known.NAME],
harness.core.deviations) get status "info" naming the deviation: still counted, still shown, not
gated. Modules: ``catalogue`` (the data file), ``subjects`` (what is loaded and how), ``checks``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.core import deviations, inputs
from harness.core.errors import InputError
from harness.core.faults import faults_for, get_fault
from harness.core.store import FAIL, INFO, NA, PASS, Row
from harness.core.suite import Context, Part, Result, Suite
from harness.results.markdown import md_escape
from harness.suites.tokenizer import checks
from harness.suites.tokenizer.catalogue import CASES_FILE, load_catalogue
from harness.suites.tokenizer.checks import SUITE, Judge, Truth
from harness.suites.tokenizer.mechanisms import mechanism_table
from harness.suites.tokenizer.subjects import discover_subjects, load_subject

DEFAULT_FUZZ_EXAMPLES = 300


class Tokenizer(Suite):
    name = SUITE
    help = "every tokenizer (reference, transformers loaders/flags) vs sentencepiece"

    def add_arguments(self, p) -> None:
        p.add_argument("--tokenizer", help="a SentencePiece tokenizer.model, or an HF tokenizer folder holding one "
                                           "(then also loaded as it is; default: the built Llama 2 fixture)")
        p.add_argument("--subjects", type=inputs.csv,
                       help="comma list of fnmatch patterns over name/loader[/flags], "
                            "e.g. 'reference,transformers.AutoTokenizer*' (default: every subject)")
        p.add_argument("--fuzz-examples", default=str(DEFAULT_FUZZ_EXAMPLES),
                       help="hypothesis-generated texts per subject (derandomised: same texts every run)")
        p.add_argument("--fuzz-seed", help="draw the fuzz texts from this seed (default: hypothesis' derandomised "
                                           "draw, the same texts on every run)")
        p.add_argument("--codepoint-step", default="97", help="sweep every Nth Unicode code point")
        p.add_argument("--no-vocab-sweep", action="store_true", help="skip the every-id / every-piece sweep")
        p.add_argument("--cases", help="catalogue TOML (default: suites/tokenizer.toml)")
        p.add_argument("--strict", action="store_true",
                       help="gate known deviations too (default: they are listed as known findings, not failed)")
        deviations.add_argument(p)
        p.add_argument("--plant", help=f"plant a tokenizer bug in the transformers subjects: "
                                       f"{', '.join(faults_for(SUITE))}")

    def run(self, a, ctx: Context) -> Result:
        from harness.core.real_tokenizer import ensure_tokenizer_model
        fuzz = inputs.integer("--fuzz-examples", a.fuzz_examples, 0, 100_000)
        fuzz_seed = None if a.fuzz_seed is None else inputs.integer("--fuzz-seed", a.fuzz_seed, 0, 2**32 - 1)
        step = inputs.integer("--codepoint-step", a.codepoint_step, 0, 0x110000)
        cat = load_catalogue(Path(a.cases) if a.cases else CASES_FILE)
        cat.known = deviations.merge(cat.known, deviations.user_deviations(a))
        fault = get_fault(a.plant, SUITE)
        path, folder = tokenizer_file(a.tokenizer) if a.tokenizer else (ensure_tokenizer_model(), None)
        check_model_file(path)
        return run_suite(path, cat, fuzz, a.subjects, step, not a.no_vocab_sweep, ctx, folder, fault,
                         strict=a.strict, fuzz_seed=fuzz_seed)


def tokenizer_file(value: str) -> tuple[Path, Path | None]:
    """--tokenizer FILE or FOLDER: (the tokenizer.model, the folder users hand transformers)."""
    path = Path(value)
    if path.is_dir():
        if not (path / "tokenizer.model").is_file():
            raise InputError(f"--tokenizer {path}: a folder without tokenizer.model (the SentencePiece model "
                             "the harness compares with)")
        return path / "tokenizer.model", path
    return path, None


def check_model_file(path: Path) -> None:
    """Bad input is exit 2 with the file named: missing, unreadable, not a SentencePiece BPE model."""
    from reference_model.tokenizer import Tokenizer as Reference, TokenizerFileError
    path = inputs.existing_file("--tokenizer", path)
    try:
        Reference(path)
    except TokenizerFileError as e:
        raise InputError(f"--tokenizer: {e}") from None
    except OSError as e:
        raise InputError(f"--tokenizer: {path}: {e.strerror}") from None
    try:
        import sentencepiece as spm
        spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise InputError(f"--tokenizer: {path}: sentencepiece cannot load it ({e})") from None


def run_suite(path: Path, cat, fuzz_examples: int, patterns: list[str] | None, codepoint_step: int,
              vocab_sweep: bool, ctx: Context, user_folder: Path | None = None, fault=None,
              strict: bool = False, fuzz_seed: int | None = None) -> Result:
    started = time.time()
    truth = Truth(path)
    judge = Judge(cat, strict)
    texts = checks.fuzz_texts(fuzz_examples, fuzz_seed)
    groups = checks.codepoint_classes(codepoint_step) if codepoint_step else {}
    log = ctx.note if not ctx.progress else (lambda msg: print(f"[tokenizer] {msg}", flush=True))
    with tempfile.TemporaryDirectory(prefix="llama-parity-tok-") as tmp:
        found = discover_subjects(path, Path(tmp), user_folder)
        if patterns is not None and not patterns:
            raise InputError("--subjects: no pattern given (e.g. --subjects 'LlamaTokenizerFast*')")
        if patterns:
            found = [s for s in found if any(fnmatch.fnmatchcase(s.label, p) or fnmatch.fnmatchcase(s.name, p)
                                             for p in patterns)]
            if not found:
                raise InputError(f"--subjects: {','.join(patterns)}: matches no subject")
        for s in found:
            load_subject(s)
            if s.na:
                judge.rows.append(Row(SUITE, s.case("subject", "-"), s.name, checks.AGAINST, "available",
                                      None, None, NA, s.na))
                log(f"{s.label}: n/a ({s.na[:100]})")
                continue
            if s.info.get("vocab_size", truth.n) < truth.n:
                s.info["vocab_missing"] = True     # every cell of it differs for this one reason
            if fault is not None:
                fault.edit_tokenizer(s, truth)
            t0 = time.time()
            checks.check_subject(judge, truth, s, cat, texts, groups, vocab_sweep)
            mine = [r for r in judge.rows if r.subject == s.name and r.case.get("loader") == s.loader
                    and r.case.get("flags") == s.flags]
            log(f"{s.label}: {sum(r.status == FAIL for r in mine)} fail, "
                f"{sum(r.status == INFO for r in mine)} known, {sum(r.status == PASS for r in mine)} pass "
                f"({time.time() - t0:.1f}s)")
    import sentencepiece
    rows = judge.rows
    extra = {
        "tokenizer": str(path),
        "tokenizer_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "catalogue": {"file": str(CASES_FILE), "version": cat.version},
        "plant": fault.name if fault is not None else None,
        "ground_truth": f"sentencepiece {getattr(sentencepiece, '__version__', '?')}",
        "fuzz_examples": len(texts),
        # every check is exact equality (tolerance 0): nothing is drawn at random, so no threshold to
        # calibrate; the fuzz texts are hypothesis' derandomised draw, the same on every run
        "seed": {"fuzz": "derandomised (fixed)" if fuzz_seed is None else fuzz_seed, "codepoint_step": codepoint_step},
        "policy": {"kind": "exact", "tolerance": 0, "strict": strict, "known_deviations": len(cat.known),
                   "release": judge.release, **deviations.user_summary(cat.known, judge.used)},
        "codepoint_step": codepoint_step,
        "subjects": [{"subject": s.name, "loader": s.loader, "flags": s.flags,
                      **({"n/a": s.na} if s.na else {}), **s.info} for s in found],
        "known_divergences": sum(r.status == INFO for r in rows),
        "divergent_subjects": sorted({"/".join(x for x in (r.subject, r.case.get("loader"), r.case.get("flags")) if x)
                                      for r in rows if r.status == FAIL}),
    }
    for line in deviations.unused_note(extra["policy"]):
        ctx.note(line)
    sections = [("Per subject", per_subject(rows)), ("Divergences (first evidence per failing or known cell)",
                                                     divergences(rows))]
    return Result([Part(SUITE, rows, extra, sections=sections, timing={"seconds": round(time.time() - started, 1)},
                        calibrators=(), mechanisms=mechanism_table(rows, judge.known_sources))], ctx.notes)


def per_subject(rows: list[Row]) -> str:
    lines = ["| subject | loader | flags | fail | known | pass | n/a |", "|---|---|---|---|---|---|---|"]
    keys: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        keys.setdefault((r.subject, str(r.case.get("loader")), str(r.case.get("flags"))), []).append(r)
    for (subj, loader, flags), rs in keys.items():
        lines.append(f"| {md_escape(subj)} | {md_escape(loader)} | {md_escape(flags)} | "
                     f"{sum(r.status == FAIL for r in rs)} | {sum(r.status == INFO for r in rs)} | "
                     f"{sum(r.status == PASS for r in rs)} | {sum(r.status == NA for r in rs)} |")
    return "\n".join(lines) + "\n"


def _shown(x: Any) -> str:
    return md_escape(x if isinstance(x, str) else repr(x))


def divergences(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        if r.status in (FAIL, INFO) and r.extra.get("divergences"):
            ev = r.extra["divergences"][0]
            lines.append(f"- **{r.status}** {md_escape(r.subject)} \\[{md_escape(r.case.get('loader'))},"
                         f"{md_escape(r.case.get('flags'))}\\] {md_escape(r.case.get('case'))} {md_escape(r.metric)}: "
                         f"text {_shown(ev.get('text'))}; expected {_shown(ev.get('expected'))} "
                         f"{_shown(ev.get('expected_pieces', ''))}; got {_shown(ev.get('got'))} "
                         f"{_shown(ev.get('got_pieces', ''))}; {md_escape(r.reason)}")
    for r in rows:
        if r.status == NA:
            lines.append(f"- **n/a** {md_escape(r.subject)}: {md_escape(r.reason)}")
    return "\n".join(lines) + "\n" if lines else "_(none)_\n"

"""`llama-parity tokenizer` and `llama-parity fixtures` (registered by harness/cli.py when present).

tokenizer: --tokenizer PATH (default: the built Llama 2 fixture) --out DIR [--subjects PATTERNS]
           [--fuzz-examples N]: every tokenizer vs sentencepiece; exit 0 pass, 1 a cell fails, 2 bad input.
fixtures:  build (or find) the cached real Llama 2 tokenizer.model and print where it is and its checksum.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_tokenizer(a: argparse.Namespace) -> int:
    from harness.suites.tokenizer import run_tokenizer_suite
    code = run_tokenizer_suite(Path(a.tokenizer) if a.tokenizer else None, Path(a.out),
                               fuzz_examples=a.fuzz_examples, subjects=a.subjects,
                               codepoint_step=a.codepoint_step, vocab_sweep=not a.no_vocab_sweep,
                               progress=not a.no_progress)
    print(f"results: {a.out}/results.csv, {a.out}/summary.json, {a.out}/report.md")
    return code


def cmd_fixtures(a: argparse.Namespace) -> int:
    from harness.core.real_tokenizer import main_fixtures
    return main_fixtures(a)


def register(sub) -> None:
    from harness.suites.tokenizer import DEFAULT_FUZZ_EXAMPLES
    tk = sub.add_parser("tokenizer", help="every tokenizer (reference, transformers loaders/flags) vs sentencepiece")
    tk.add_argument("--tokenizer", help="a SentencePiece tokenizer.model (default: the built Llama 2 fixture)")
    tk.add_argument("--out", default="reports/latest/tokenizer", help="output folder")
    tk.add_argument("--subjects", type=_csv,
                    help="comma list of fnmatch patterns over name/loader[/flags], e.g. 'reference,transformers.AutoTokenizer*'")
    tk.add_argument("--fuzz-examples", type=int, default=DEFAULT_FUZZ_EXAMPLES,
                    help="hypothesis-generated texts per subject (derandomised: same texts every run)")
    tk.add_argument("--codepoint-step", type=int, default=97, help="sweep every Nth Unicode code point")
    tk.add_argument("--no-vocab-sweep", action="store_true", help="skip the every-id / every-piece sweep")
    tk.add_argument("--no-progress", action="store_true")
    tk.set_defaults(func=cmd_tokenizer)

    fx = sub.add_parser("fixtures", help="build (or find) the cached real Llama 2 tokenizer.model")
    fx.add_argument("--cache-dir", help="folder for tokenizer.model + vectors + PROVENANCE.json "
                                        "(default: $LLAMA_PARITY_CACHE/tokenizer or ~/.cache/llama-parity/tokenizer)")
    fx.set_defaults(func=cmd_fixtures)

"""Tokenizer speed: the reference (pure Python) vs sentencepiece (C++), in MB/s of UTF-8 input.

    python benchmarks/tokenizer_speed.py [--mb 1.0] [--tokenizer PATH]

Text: CPython's own English (pydoc_data topics, then standard-library docstrings read with ast),
cut at --mb megabytes. Measured: a cold encode (fresh tokenizer, empty word cache), a warm encode (the
same text again), encode line by line, and decode; the ids are checked equal to sentencepiece's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def english(n_bytes: int) -> str:
    """pydoc topics, then docstrings read (never imported) from the standard library's sources."""
    import ast
    import sysconfig
    from pydoc_data.topics import topics
    parts = [topics[k] for k in sorted(topics)]
    size = sum(len(p.encode()) for p in parts)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size >= n_bytes:
            break
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
                    size += len(doc.encode())
    text = "\n\n".join(parts)
    while len(text.encode()) < n_bytes:
        text += "\n\n" + text
    return text.encode()[:n_bytes].decode("utf-8", "ignore")


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--tokenizer")
    a = ap.parse_args()
    import sentencepiece as spm
    from harness.core.real_tokenizer import ensure_tokenizer_model
    from reference_model.tokenizer import Tokenizer
    path = Path(a.tokenizer) if a.tokenizer else ensure_tokenizer_model()
    text = english(int(a.mb * 1e6))
    mb = len(text.encode()) / 1e6
    lines = text.split("\n")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    ref, load_s = timed(Tokenizer, path)
    rows = []
    want, t = timed(sp.encode, text)
    rows.append(("sentencepiece", "encode (one string)", t))
    got, t = timed(ref.encode, text, False, False)
    rows.append(("reference", "encode cold (one string)", t))
    assert got == want, "reference ids differ from sentencepiece"
    _, t = timed(ref.encode, text, False, False)
    rows.append(("reference", "encode warm (word cache)", t))
    _, t = timed(lambda: [sp.encode(x) for x in lines])
    rows.append(("sentencepiece", "encode line by line", t))
    fresh = Tokenizer(path)
    got_lines, t = timed(lambda: [fresh.encode(x, False, False) for x in lines])
    rows.append(("reference", "encode line by line, cold", t))
    assert got_lines == [sp.encode(x) for x in lines]
    s_sp, t = timed(sp.decode, want)
    rows.append(("sentencepiece", "decode", t))
    s_ref, t = timed(ref.decode, want)
    rows.append(("reference", "decode", t))
    assert s_ref == s_sp
    print(f"{mb:.2f} MB of English, {len(want)} tokens; reference load {load_s:.2f}s; ids identical")
    print(f"{'subject':15} {'what':30} {'seconds':>8} {'MB/s':>8}")
    for who, what, t in rows:
        print(f"{who:15} {what:30} {t:8.2f} {mb / t:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

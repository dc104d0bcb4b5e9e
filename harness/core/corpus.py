"""Real text as input: a file or a named corpus, tokenized with the checkpoint's tokenizer and cut
into windows of ``ctx`` tokens that each start with BOS.

Named corpora ship with the repository or with Python itself (PSF licence), so that the main job
measures on real prose with no download:

  heldout       the 180 paragraphs of CPython's pydoc topics that the embedded model never saw in
                training (suites/lmeval/data/heldout_ppl.jsonl; ~10K tokens)
  pydoc-topics  every prose paragraph of CPython's ``pydoc_data/topics.py`` (~120K tokens, partly
                the embedded model's training text: fine for parity, not for held-out scores)

A window's targets are the next tokens of the text (the last position's target is the first
token of the next window; the last window's last position has none). Tokens that do not fill a last
window are not measured, so every batch is rectangular and no padding is needed; how many, and why,
is said on the console and kept in summary.json. A text shorter than one window is one shorter window.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from harness.core import SUITES
from harness.core.errors import InputError

NAMED = ("heldout", "pydoc-topics")
MAX_TEXT_BYTES = 512 << 20


@dataclass
class Windows:
    """Token windows of one text: ids (n, ctx) with BOS first, targets (n, ctx) with -1 where none."""
    name: str               # the corpus name or the file
    ids: "object"           # torch.LongTensor
    targets: "object"
    tokens: int             # text tokens covered (windows * (ctx - 1))
    sha256: str             # of the token stream, for the resume key and the report
    dropped: int = 0        # text tokens not measured (a last partial window, past --max-tokens)
    total: int = 0          # text tokens in all
    note: str = ""          # what was not measured and why, said on the console and kept in the summary

    def batches(self, batch: int):
        for start in range(0, self.ids.shape[0], batch):
            yield self.ids[start:start + batch], self.targets[start:start + batch]


def text_of(name: str | None, path: str | None) -> tuple[str, str]:
    """(label, text) of --corpus NAME or --text FILE."""
    if path is not None:
        from harness.core.inputs import path_problem
        p = Path(path)
        if problem := path_problem(p):
            raise InputError(f"--text {p}: {problem}")
        if p.stat().st_size > MAX_TEXT_BYTES:
            raise InputError(f"--text {p}: larger than {MAX_TEXT_BYTES >> 20} MB")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--text {p}: not UTF-8 text ({e})") from None
        if not text.strip():
            raise InputError(f"--text {p}: no text in it")
        return str(p), text
    if name == "heldout":
        rows = [json.loads(line) for line in (SUITES / "lmeval" / "data" / "heldout_ppl.jsonl").read_text(
            encoding="utf-8").splitlines() if line.strip()]
        return name, "\n\n".join(r["text"] for r in rows)
    if name == "pydoc-topics":
        import pydoc_data.topics as topics
        paragraphs = [p.strip() for key in sorted(topics.topics) for p in re.split(r"\n\s*\n", topics.topics[key])]
        return name, "\n\n".join(p for p in paragraphs if p and not p.startswith(("   ", ">>>")))
    raise InputError(f"--corpus: unknown corpus {name!r} (known: {', '.join(NAMED)})")


@dataclass
class Vocabulary:
    """A tokenizer as the harness uses it: the SentencePiece pieces of its tokenizer.model plus the
    tokens added beside it (``tokenizer.add_special_tokens({"pad_token": "<pad>"})`` writes
    ``<pad>`` = 32000 into added_tokens.json and tokenizer_config.json's added_tokens_decoder, and
    leaves tokenizer.model at 32000 pieces). Together they must cover the model's vocabulary."""
    path: Path                    # the tokenizer.model
    pieces: int
    added: dict[int, str]         # id -> content, ids >= pieces only
    sha256: str                   # of tokenizer.model and the added tokens: which tokenizer, exactly

    @property
    def size(self) -> int:
        return self.pieces + len(self.added)

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "pieces": self.pieces,
                "added": {str(i): t for i, t in sorted(self.added.items())}}


ADDED_FILES = ("added_tokens.json", "tokenizer_config.json", "tokenizer.json")


def added_tokens(folder: Path, pieces: int) -> dict[int, str]:
    """The tokens added past the SentencePiece pieces, from the files HF writes beside
    tokenizer.model (read as data, never executed); files that disagree on an id are refused."""
    found: dict[int, tuple[str, str]] = {}

    def add(file: Path, where: str, token, ident) -> None:
        if not isinstance(token, str) or not isinstance(ident, int) or isinstance(ident, bool) or ident < 0:
            raise InputError(f"{file} [{where}]: {token!r} -> {ident!r} is not a token and a non-negative id")
        if ident < pieces:
            return                  # <unk>, <s>, </s> are listed again in added_tokens_decoder: pieces already
        if ident in found and found[ident][0] != token:
            raise InputError(f"{file} [{where}]: id {ident} is {token!r}, but {found[ident][1]} says {found[ident][0]!r}")
        found[ident] = (token, file.name)

    for name in ADDED_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputError(f"{file}: not readable JSON ({e})") from None
        if name == "added_tokens.json":
            if not isinstance(data, dict):
                raise InputError(f"{file}: expected an object of token -> id")
            for token, ident in data.items():
                add(file, token, token, ident)
        elif name == "tokenizer_config.json":
            decoder = data.get("added_tokens_decoder") if isinstance(data, dict) else None
            if decoder is None:
                continue
            if not isinstance(decoder, dict):
                raise InputError(f"{file} [added_tokens_decoder]: expected an object of id -> token")
            for ident, entry in decoder.items():
                content = entry.get("content") if isinstance(entry, dict) else None
                add(file, f"added_tokens_decoder.{ident}", content, int(ident) if ident.isdigit() else ident)
        else:
            listed = data.get("added_tokens") if isinstance(data, dict) else None
            for k, entry in enumerate(listed if isinstance(listed, list) else []):
                if isinstance(entry, dict):
                    add(file, f"added_tokens[{k}]", entry.get("content"), entry.get("id"))
    return {i: t for i, (t, _) in sorted(found.items())}


def vocabulary(path: Path, arg: str) -> Vocabulary:
    """A tokenizer.model and the tokens added in its folder (exit 2 naming ``arg`` when unusable)."""
    import hashlib

    from reference_model.tokenizer import TokenizerFileError, read_model_file
    from harness.core.inputs import path_problem
    path = Path(path)
    if problem := path_problem(path):
        raise InputError(f"{arg}: {path}: {problem}")
    try:
        model = read_model_file(path)
    except TokenizerFileError as e:
        raise InputError(f"{arg} {e}") from None
    if not model.pieces:
        raise InputError(f"{arg} {path}: no pieces (not a SentencePiece model)")
    pieces = len(model.pieces)
    added = added_tokens(path.parent, pieces)
    gaps = sorted(set(range(pieces, pieces + len(added))) - set(added))
    if gaps:
        raise InputError(f"{arg}: {path.parent}: added token ids {sorted(added)} leave id {gaps[0]} without a token "
                         f"(tokenizer.model has {pieces} pieces; added ids must follow them without a gap)")
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps(sorted(added.items())).encode())
    return Vocabulary(path, pieces, added, h.hexdigest()[:16])


def tokenizer_for(model_dir: Path, vocab: int, given: str | None):
    """(sentencepiece processor, Vocabulary) for the checkpoint: --tokenizer, else tokenizer.model
    beside the weights, else the real Llama 2 tokenizer when the model has its 32000-piece
    vocabulary. Its pieces plus the tokens added beside it must be the model's vocabulary."""
    import sentencepiece as spm
    if given:
        path = Path(given)
        path = path / "tokenizer.model" if path.is_dir() else path
        arg = "--tokenizer"
    elif (model_dir / "tokenizer.model").is_file():
        path, arg = model_dir / "tokenizer.model", f"{model_dir}/tokenizer.model"
    elif vocab == 32000:
        from harness.core.real_tokenizer import ensure_tokenizer_model
        path, arg = ensure_tokenizer_model(), "the Llama 2 tokenizer fixture"
    else:
        raise InputError(f"--corpus/--text: the model's vocabulary has {vocab} pieces and no tokenizer.model is "
                         "beside its weights; give --tokenizer, or use --shapes")
    voc = vocabulary(path, arg)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise InputError(f"{arg}: {path}: sentencepiece cannot load it ({e})") from None
    if voc.size != vocab:
        extra = f" plus {len(voc.added)} added token(s) beside it" if voc.added else ""
        raise InputError(f"{arg}: {path} has {sp.get_piece_size()} pieces{extra}, the model's vocabulary {vocab}")
    return sp, voc


def windows(label: str, text: str, sp, ctx: int, max_tokens: int | None) -> Windows:
    """The text's tokens cut into windows of ``ctx`` (BOS first). A text shorter than one window is
    measured as one shorter window; tokens that do not fill a last window, and tokens past
    --max-tokens, are counted in ``dropped`` and named in ``note``: never dropped without a word."""
    import hashlib

    import torch
    if ctx < 2:
        raise InputError(f"--ctx: {ctx}: a window needs BOS and at least one token")
    full = sp.encode(text)
    stream = full if max_tokens is None else full[:max_tokens]
    if not stream:
        raise InputError(f"{label}: no tokens in it")
    step = ctx - 1
    notes = []
    if len(stream) < step:
        notes.append(f"{label}: {len(stream)} tokens, fewer than one window of --ctx {ctx}: measured as one "
                     f"window of {len(stream) + 1} (BOS and the text)")
        step = len(stream)
    n = len(stream) // step
    left = len(stream) - n * step
    if left:
        notes.append(f"{label}: the last {left} of {len(stream)} tokens do not fill a window of --ctx {step + 1} "
                     f"and are not measured (a window holds --ctx - 1 text tokens after BOS)")
    if len(full) > len(stream):
        notes.append(f"{label}: {len(full) - len(stream)} of {len(full)} tokens are past --max-tokens {max_tokens} "
                     "and are not measured (--max-tokens all measures them)")
    body = torch.tensor(stream[:n * step], dtype=torch.long).view(n, step)
    ids = torch.cat([torch.full((n, 1), sp.bos_id(), dtype=torch.long), body], dim=1)
    # Position j predicts body[j]; the last position predicts the next window's first token.
    following = torch.tensor([stream[(k + 1) * step] if (k + 1) * step < len(stream) else -1 for k in range(n)],
                             dtype=torch.long)
    targets = torch.cat([body, following.view(n, 1)], dim=1)
    sha = hashlib.sha256(json.dumps(stream[:n * step]).encode()).hexdigest()[:32]
    return Windows(label, ids, targets, n * step, sha, dropped=len(full) - n * step, total=len(full),
                   note="; ".join(notes))

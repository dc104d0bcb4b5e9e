"""Real text as input: a file or a named corpus, tokenized with the checkpoint's tokenizer and cut
into windows of ``ctx`` tokens that each start with BOS.

Named corpora ship with the repository or with Python itself (PSF licence), so that the main job
measures on real prose with no download:

  heldout       the 180 paragraphs of CPython's pydoc topics that the embedded model never saw in
                training (suites/lmeval/data/heldout_ppl.jsonl; ~10K tokens)
  pydoc-topics  every prose paragraph of CPython's ``pydoc_data/topics.py`` (~120K tokens, partly
                the embedded model's training text: fine for parity, not for held-out scores)

A window's targets are the next tokens of the text (the last position's target is the first
token of the next window; the last window's last position has none). A partial last window is
dropped, so every batch is rectangular and no padding is needed.
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

    def batches(self, batch: int):
        for start in range(0, self.ids.shape[0], batch):
            yield self.ids[start:start + batch], self.targets[start:start + batch]


def text_of(name: str | None, path: str | None) -> tuple[str, str]:
    """(label, text) of --corpus NAME or --text FILE."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"--text {p}: file not found")
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


def tokenizer_for(model_dir: Path, vocab: int, given: str | None):
    """A sentencepiece processor for the checkpoint: --tokenizer, else tokenizer.model beside the
    weights, else the real Llama 2 tokenizer when the model has its 32000-piece vocabulary."""
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
    if not path.is_file():
        raise InputError(f"{arg}: {path}: file not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise InputError(f"{arg}: {path}: sentencepiece cannot load it ({e})") from None
    if sp.get_piece_size() != vocab:
        raise InputError(f"{arg}: {path} has {sp.get_piece_size()} pieces, the model's vocabulary {vocab}")
    return sp


def windows(label: str, text: str, sp, ctx: int, max_tokens: int | None) -> Windows:
    import hashlib

    import torch
    if ctx < 2:
        raise InputError(f"--ctx: {ctx}: a window needs BOS and at least one token")
    stream = sp.encode(text)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    step = ctx - 1
    n = len(stream) // step
    if n == 0:
        raise InputError(f"{label}: {len(stream)} tokens, fewer than one window of --ctx {ctx}")
    body = torch.tensor(stream[:n * step], dtype=torch.long).view(n, step)
    ids = torch.cat([torch.full((n, 1), sp.bos_id(), dtype=torch.long), body], dim=1)
    # Position j predicts body[j]; the last position predicts the next window's first token.
    following = torch.tensor([stream[(k + 1) * step] if (k + 1) * step < len(stream) else -1 for k in range(n)],
                             dtype=torch.long)
    targets = torch.cat([body, following.view(n, 1)], dim=1)
    sha = hashlib.sha256(json.dumps(stream[:n * step]).encode()).hexdigest()[:32]
    return Windows(label, ids, targets, n * step, sha)

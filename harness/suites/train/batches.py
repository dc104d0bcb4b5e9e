"""Training batches: token ids, the attention mask and the labels, laid out as fine-tuning recipes
lay them out (labels = input_ids, -100 where no loss is taken; the model shifts them by one).

  corpus   real-text windows of the corpus machinery, BOS first, every position labelled
  long     one real-text window of >= 1024 tokens (RoPE precision under autocast shows with position)
  right    rows of uneven lengths right-padded, labels -100 on the pads
  left     rows left-padded with labels that mask the pads *and* the first real token: without the
           latter the last pad is asked to predict the first real token (see ``naive_left_labels``)
  sft      a prompt mask: labels -100 on each row's prompt, loss on the response only

The truth of a batch is the per-token mean of the cross entropy over every labelled token of the
batch (transformers' convention), each row computed alone at its real positions by the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
KINDS = ("corpus", "long", "right", "left", "sft")


@dataclass
class Batch:
    kind: str
    ids: torch.Tensor                   # (rows, width) long
    mask: torch.Tensor                  # (rows, width) 1 where a real token sits
    labels: torch.Tensor                # (rows, width) the ids, IGNORE where no loss is taken
    label: str = ""                     # which text

    @property
    def name(self) -> str:
        return self.kind

    @property
    def shape(self) -> str:
        return f"{self.ids.shape[0]}x{self.ids.shape[1]}"

    def key(self) -> str:
        return f"{self.kind}/{self.shape}"

    @property
    def padded(self) -> bool:
        return bool((self.mask == 0).any())

    def tokens(self) -> int:
        """Labelled tokens the loss averages over (the ones a position predicts)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def rows(self):
        """(ids, labels) of each row at its real positions only: what the oracle runs."""
        for i in range(self.ids.shape[0]):
            real = self.mask[i].bool()
            yield self.ids[i][real], self.labels[i][real]

    def describe(self) -> dict:
        return {"input": self.kind, "shape": self.shape, "lengths": self.mask.sum(-1).tolist(),
                "labelled": self.tokens(), "text": self.label}


def windows_batch(kind: str, ids: torch.Tensor, label: str) -> Batch:
    return Batch(kind, ids.clone(), torch.ones_like(ids), ids.clone(), label)


def padded_batch(kind: str, rows: list[torch.Tensor], pad_id: int, side: str, label: str,
                 prompt: list[int] | None = None) -> Batch:
    """Rows of different lengths in one batch, padded on ``side`` with ``pad_id``; labels IGNORE on
    pads (and on each row's first ``prompt[i]`` tokens: an SFT prompt mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, r in enumerate(rows):
        at = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, at], mask[i, at] = r, 1
        lab = r.clone()
        if prompt is not None:
            lab[:prompt[i]] = IGNORE
        if side == "left":
            # The first real token is predicted by nothing in the row; left as a label, the last pad
            # would be asked to predict it (naive_left_labels).
            lab[0] = IGNORE
        labels[i, at] = lab
    return Batch(kind, ids, mask, labels, label)


def naive_left_labels(batch: Batch) -> torch.Tensor:
    """The labels most recipes write for a left-padded batch: the ids with only the pads masked.
    After the model's shift the last pad position then predicts the row's first real token: a loss
    term from a position that holds no token, which the oracle's per-row loss does not have."""
    labels = batch.ids.clone()
    labels[batch.mask == 0] = IGNORE
    return labels


def build(kinds: list[str], text: torch.Tensor, long_text: torch.Tensor | None, cfg: dict, pad_id: int,
          label: str) -> list[Batch]:
    """The default batches from token windows of one text (``text``: (n, ctx) windows, BOS first;
    ``long_text``: (1, long_ctx)). Padded rows are cut from the windows at the configured lengths."""
    out = []
    need = cfg["corpus_rows"]
    if "corpus" in kinds:
        out.append(windows_batch("corpus", text[:need], label))
    spare = text[need:] if text.shape[0] > need else text
    if "long" in kinds and long_text is not None:
        out.append(windows_batch("long", long_text, label))
    if "right" in kinds:
        rows = [spare[i % spare.shape[0]][:n] for i, n in enumerate(cfg["right_lengths"])]
        out.append(padded_batch("right", rows, pad_id, "right", label))
    if "left" in kinds:
        rows = [spare[(i + 1) % spare.shape[0]][:n] for i, n in enumerate(cfg["left_lengths"])]
        out.append(padded_batch("left", rows, pad_id, "left", label))
    if "sft" in kinds:
        rows = [spare[(i + 2) % spare.shape[0]][:n] for i, n in enumerate(cfg["sft_lengths"])]
        out.append(padded_batch("sft", rows, pad_id, "right", label, prompt=cfg["sft_prompt"]))
    return out

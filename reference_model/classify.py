"""Sequence classification on top of the reference: a linear score head on the final, normed
hidden state of one token per row.

Pooling rule (the one transformers documents for LlamaForSequenceClassification): the last
token of each row that is not the pad token, found through ``pad_id``; with left padding that
is the row's final position, with right padding the one before the first pad. Without a pad
token there is no way to tell padding apart, so only a batch of one is defined: its last token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .model import Transformer


def last_real_token(tokens: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    """(bsz,) index of each row's rightmost non-pad token."""
    bsz, seqlen = tokens.shape
    if pad_id is None:
        if bsz != 1:
            raise ValueError("no pad token configured: only a batch of one can be pooled")
        return torch.full((1,), seqlen - 1, dtype=torch.long, device=tokens.device)
    real = tokens != pad_id
    if not bool(real.any(-1).all()):
        raise ValueError("a row holds only pad tokens: nothing to pool")
    idx = torch.arange(seqlen, device=tokens.device).expand(bsz, seqlen)
    return torch.where(real, idx, torch.full_like(idx, -1)).max(-1).values


class SequenceClassifier(nn.Module):
    def __init__(self, model: Transformer, n_labels: int, pad_id: Optional[int]):
        super().__init__()
        self.model, self.pad_id = model, pad_id
        w = model.output.weight
        self.score = nn.Linear(model.args.dim, n_labels, bias=False).to(w.device, w.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(bsz, n_labels) scores, float32 at least, like the model's logits."""
        _, hidden = self.model(tokens, return_hidden=True, key_mask=key_mask, positions=positions)
        h = self.model.norm(hidden[-1])
        pick = last_real_token(tokens, self.pad_id)
        pooled = h[torch.arange(tokens.shape[0], device=tokens.device), pick]
        scores = self.score(pooled)
        return scores.to(torch.promote_types(scores.dtype, torch.float32))

"""Greedy decoding with the reference's own KV cache, one prompt at a time.

Meta's generate loop, reduced to what parity needs: prefill the prompt once, then feed one new
token per step at ``start_pos`` = the number of cached positions. Every step's logits are kept
so that a divergence from another implementation can be told apart from a near tie.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import Transformer


@dataclass
class Greedy:
    tokens: list[int]              # the generated tokens (prompt excluded)
    logits: torch.Tensor           # (steps, vocab): the distribution each token was picked from


@torch.inference_mode()
def greedy(model: Transformer, prompt: list[int], max_new_tokens: int,
           eos_id: int | None = None) -> Greedy:
    if not prompt:
        raise ValueError("greedy: the prompt is empty")
    device = model.tok_embeddings.weight.device
    step_logits = model(torch.tensor([prompt], device=device), start_pos=0, use_cache=True)[0, -1]
    tokens, kept = [], []
    pos = len(prompt)
    for _ in range(max_new_tokens):
        kept.append(step_logits.float().cpu() if step_logits.dtype != torch.float64 else step_logits.cpu())
        nxt = int(step_logits.argmax())
        tokens.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        step_logits = model(torch.tensor([[nxt]], device=device), start_pos=pos, use_cache=True)[0, -1]
        pos += 1
    return Greedy(tokens, torch.stack(kept))


def top2_margin(logits: torch.Tensor) -> float:
    """logit(best) - logit(second best): how close the greedy choice was to a tie."""
    top = logits.double().topk(2).values
    return float(top[0] - top[1])

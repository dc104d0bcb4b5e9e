"""Cases: the cells of the logits matrix, and the seeded inputs they run on. Data, not model calls."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


@dataclass(frozen=True)
class Case:
    dtype: str
    attn: str
    tp: int
    shape: Shape
    device: str

    def settings(self) -> dict:
        d = asdict(self)
        d["shape"] = str(self.shape)
        return d


def matrix(dtypes, attns, tps, shapes, device) -> list[Case]:
    return [Case(d, a, t, s, device) for d, a, t, s in itertools.product(dtypes, attns, tps, shapes)]


def make_inputs(shape: Shape, vocab_size: int, seed: int, bos_id: int = 1):
    """Token ids (batch, seq): BOS then uniform ids above the special tokens, from a seeded generator."""
    import torch
    gen = torch.Generator().manual_seed(seed * 1_000_003 + shape.batch * 10_007 + shape.seq)
    low = min(3, vocab_size - 1)
    ids = torch.randint(low, vocab_size, (shape.batch, shape.seq), generator=gen)
    ids[:, 0] = bos_id
    return ids

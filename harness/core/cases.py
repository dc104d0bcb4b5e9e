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


# Llama 2's SentencePiece ids of <unk>, <s> and </s> (the same in every Llama 2 vocabulary).
UNK, BOS, EOS = 0, 1, 2


def special_positions(seq: int, row: int = 0) -> list[tuple[int, str]]:
    """Where ``with_special_ids`` puts each special id in a row of ``seq`` tokens (BOS at 0 stays):
    a packed-data boundary (</s> then <s> mid-row), an <unk> inside, the pad id inside (when the
    model has one) and </s> last, the token generation feeds back. Rows shift the inner ones so a
    batch sees them in different contexts. Rows shorter than 8 keep only </s> last."""
    if seq < 2:
        return []
    if seq < 8:
        return [(seq - 1, "eos")]
    shift = row % max(1, seq // 8)
    at = {seq // 3 + shift: "eos", seq // 3 + shift + 1: "bos", seq // 2 + 1 + shift: "unk",
          (2 * seq) // 3 + 1 + shift: "pad", seq - 1: "eos"}
    return sorted(at.items())


def with_special_ids(ids, pad_id: int | None = None):
    """``ids`` (batch, seq) with the vocabulary's special ids placed where they matter (see
    ``special_positions``): random ids are drawn above them, so without this no default input
    would ever hold one, and a bug confined to their embedding rows would pass unseen."""
    ids = ids.clone()
    vocab_ids = {"unk": UNK, "bos": BOS, "eos": EOS, "pad": pad_id}
    for r in range(ids.shape[0]):
        for pos, name in special_positions(ids.shape[1], r):
            if vocab_ids[name] is not None:
                ids[r, pos] = vocab_ids[name]
    return ids

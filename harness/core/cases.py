"""Cases: the cells of the logits matrix, and the inputs they run on. Data, not model calls."""
from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import torch

from harness.core.errors import InputError

DEFAULT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_ATTN = ("eager", "sdpa")
DEFAULT_TP = (1, 2)
DEFAULT_SHAPES = ("1x16", "2x64")
KNOWN_DTYPES = ("float32", "bfloat16", "float16")
KNOWN_ATTN = ("eager", "sdpa", "flash_attention_2", "flex_attention")


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


def parse_shapes(specs: list[str]) -> list[Shape]:
    shapes = []
    for spec in specs:
        m = re.fullmatch(r"(\d+)x(\d+)", spec.strip())
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise InputError(f"--shapes: {spec!r} is not BATCHxSEQ with positive numbers (e.g. 2x64)")
        shapes.append(Shape(int(m[1]), int(m[2])))
    return shapes


def check_choices(arg: str, values: list[str], known: tuple[str, ...]) -> list[str]:
    for v in values:
        if v not in known:
            raise InputError(f"{arg}: unknown value {v!r} (choose from {', '.join(known)})")
    return list(dict.fromkeys(values))


def parse_tp(values: list[str]) -> list[int]:
    out = []
    for v in values:
        if not str(v).isdigit() or int(v) < 1:
            raise InputError(f"--tp: {v!r} is not a positive integer")
        out.append(int(v))
    return list(dict.fromkeys(out))


def matrix(dtypes, attns, tps, shapes, device) -> list[Case]:
    return [Case(d, a, t, s, device) for d, a, t, s in itertools.product(dtypes, attns, tps, shapes)]


def make_inputs(shape: Shape, vocab_size: int, seed: int, bos_id: int = 1) -> torch.Tensor:
    """Token ids: BOS then uniform ids above the special tokens, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + shape.batch * 10_007 + shape.seq)
    low = min(3, vocab_size - 1)
    ids = torch.randint(low, vocab_size, (shape.batch, shape.seq), generator=gen)
    ids[:, 0] = bos_id
    return ids

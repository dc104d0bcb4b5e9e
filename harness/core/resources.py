"""What a run will need, checked before any model or input is built.

A config can claim a 10^9-layer model and a shape can ask for a million positions: both are
refused here, from arithmetic on the config and the arguments, instead of after minutes of work or
in a MemoryError. Two checks:

- the weight files must be able to hold what the config describes (a config that promises more
  parameters than its files have bytes for is not the config of these weights);
- the estimated peak (weights at the dtypes the run builds, the position tables the config's
  max_seq_len asks for, the largest forward's activations, the logits kept for comparison) must fit the memory the device has; ``--memory-budget``
  overrides the detected figure.

The estimate is deliberately simple and on the high side: it is a guard against the impossible,
not a planner (``llama-parity place`` plans real placements).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from harness.core.errors import InputError
from reference_model.model import ModelArgs

BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2 ** 30


def parameters(args: ModelArgs) -> int:
    hd, kv, ffn = args.head_dim, args.kv_heads, args.ffn_hidden
    per_layer = args.dim * args.n_heads * hd * 2 + 2 * args.dim * kv * hd + 3 * args.dim * ffn + 2 * args.dim
    return args.n_layers * per_layer + 2 * args.vocab_size * args.dim + args.dim


def forward_bytes(args: ModelArgs, batch: int, seq: int, dtype: str) -> int:
    """Peak activations of one forward: the attention scores of a layer (softmax in float32 at
    least), its MLP intermediates, the residual stream, and the logits (float32 at least)."""
    b = BYTES[dtype]
    up = max(b, 4)
    scores = batch * args.n_heads * seq * seq * (b + up) * 2
    mlp = batch * seq * args.ffn_hidden * b * 3
    stream = batch * seq * args.dim * b * 8
    logits = batch * seq * args.vocab_size * (b + up)
    return scores + mlp + stream + logits


@dataclass
class Need:
    what: str
    bytes: int


def position_tables(args: ModelArgs) -> Need:
    """The tables a model builds from the config's context length, whatever the input's: the
    reference precomputes RoPE angles for 2 x max_seq_len positions as Meta does (float64 angles and
    complex128 for the oracle, float32 / complex64 for the reference), and transformers releases up
    to 4.3x cache cos and sin for max_position_embeddings positions. A config claiming 2^30
    positions asks for hundreds of GiB here, before any input is seen."""
    half = args.head_dim // 2
    n = 2 * args.max_seq_len
    reference = n * half * (8 + 16) + n * half * (4 + 8)      # oracle (angles + complex) and reference
    transformers = args.max_seq_len * args.head_dim * 2 * 4    # cos and sin, float32
    return Need(f"position tables for the config's max_seq_len {args.max_seq_len} (max_position_embeddings in "
                "config.json): RoPE angles of 2 x that many positions", reference + transformers)


def logits_run(args: ModelArgs, dtypes: list[str], shapes: list, stored_bytes: int) -> list[Need]:
    """The logits suite (and the others that run whole models one after another): the checkpoint
    as stored, the float64 oracle with its largest forward, then the reference and transformers
    at the widest dtype with theirs, and the oracle's logits of every input kept throughout."""
    n = parameters(args)
    biggest = max(shapes, key=lambda s: s.batch * s.seq)
    truth = sum(s.batch * s.seq * args.vocab_size * 8 for s in shapes)
    wide = max(dtypes, key=lambda d: BYTES[d]) if dtypes else "float32"
    return [
        position_tables(args),
        Need("the checkpoint as stored", stored_bytes),
        Need("the oracle's logits of every input (float64)", truth),
        Need("the float64 oracle and its largest forward",
             n * 8 + forward_bytes(args, biggest.batch, biggest.seq, "float64")),
        Need(f"the reference and transformers at {wide} and their largest forward",
             2 * n * BYTES[wide] + 2 * forward_bytes(args, biggest.batch, biggest.seq, wide)),
    ]


def available(device: str) -> int:
    """Memory this device can give a run now: free GPU memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62     # unknown: do not refuse


def check_files(args: ModelArgs, stored_bytes: int, where: str) -> None:
    """The weight files must hold at least one byte per parameter the config describes (the
    narrowest dtype a checkpoint stores is two bytes; one leaves room for any honest layout)."""
    n = parameters(args)
    if stored_bytes < n:
        raise InputError(f"{where}: the config describes {n:,} parameters ({n * 2 / GiB:.3g} GiB at 16 bits), "
                         f"but the weight files hold {stored_bytes:,} bytes: this is not the config of these weights")


def check(needs: list[Need], device: str, budget: int | None, flag: str = "--memory-budget") -> int:
    """Refuse (exit 2) when the sum of needs exceeds the budget (the device's memory unless given)."""
    total = sum(n.bytes for n in needs)
    have = available(device) if budget is None else budget
    if total > have:
        parts = "; ".join(f"{n.what} {n.bytes / GiB:.3g} GiB" for n in sorted(needs, key=lambda n: -n.bytes)[:3])
        source = f"{flag} {have / GiB:.3g} GiB" if budget is not None else f"{have / GiB:.3g} GiB available on {device}"
        top = max(needs, key=lambda n: n.bytes)
        fix = ("lower the checkpoint's max_seq_len / max_position_embeddings" if top.what.startswith("position tables")
               else "use smaller --shapes or fewer dtypes")
        raise InputError(f"this run needs about {total / GiB:.3g} GiB ({parts}), more than {source}; "
                         f"{fix}, or set {flag} to override the check")
    return total

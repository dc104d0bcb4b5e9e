"""Llama 2 computed model-parallel, the way Meta's original code computed 13B (MP 2) and 70B (MP 8).

Each of k ranks loads only its own ``consolidated.NN.pth`` and holds fairscale's layers:

- ``tok_embeddings``: ParallelEmbedding, split on the *embedding* dim; each rank looks up its
  columns, then an all-gather rebuilds the full vector (exact, no arithmetic).
- wq, wk, wv, w1, w3, output: ColumnParallelLinear, each rank computes its output rows (its
  heads, its FFN slice, its vocabulary slice); ``output`` is all-gathered.
- wo, w2: RowParallelLinear, each rank multiplies its input columns and an **all-reduce sums the
  k partial products in the activation dtype**. Those k roundings, and their summation order,
  are what distinguishes "the original logits" at degree k from a single-GPU run, and what
  transformers' ``pretraining_tp`` imitates.
- norms are replicated.

The forward is written once over a *group* of rank-local tensors. ``_DistGroup`` holds one rank
and talks to the others through ``torch.distributed`` (gloo on CPU, NCCL on CUDA);
``_EmulatedGroup`` holds every rank in one process and reduces in rank order, so the two can be
checked against each other. Like the rest of the reference, this never imports transformers or
the harness.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .checkpoint import load_meta_args, meta_shard_files, shard_dim, torch_load
from .errors import CheckpointError
from .model import ModelArgs, RMSNorm, apply_rotary_emb, precompute_freqs_cis, repeat_kv


def check_degree(args: ModelArgs, k: int, where: str = "params.json") -> None:
    """Meta's code needs every split to be whole heads / whole slices on each rank."""
    for name, size in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("dim", args.dim),
                       ("ffn hidden", args.ffn_hidden), ("vocab_size", args.vocab_size)):
        if k < 1 or size % k:
            raise CheckpointError(where, name, f"{size} does not split across model-parallel degree {k}")


def load_rank(path: str | Path, rank: int, world: int) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """What one rank of Meta's code loads: params.json and its own shard, nothing else."""
    path = Path(path)
    files = meta_shard_files(path)
    if len(files) != world:
        raise CheckpointError(str(path), None, f"{len(files)} shard file(s) but model-parallel degree {world}: "
                                               "Meta's code needs one shard per rank")
    args = load_meta_args(path)
    shard = torch_load(files[rank])
    if args.vocab_size <= 0:   # -1 in params.json: the output rows of every rank add up to the vocab
        args.vocab_size = shard["output.weight"].shape[0] * world
    check_degree(args, world, str(path / "params.json"))
    for key, w in shard.items():
        try:
            dim = shard_dim(key)
        except KeyError:
            raise CheckpointError(str(files[rank]), key, "unexpected tensor (not part of a Llama 2 checkpoint)") from None
        if dim is not None and key != "rope.freqs":
            full = _full_shape(args, key)
            want = tuple(s // world if d == dim else s for d, s in enumerate(full))
            if tuple(w.shape) != want:
                raise CheckpointError(str(files[rank]), key, f"shape {tuple(w.shape)}, expected {want} for rank "
                                                             f"{rank} of {world}")
    return args, shard


def _full_shape(args: ModelArgs, key: str) -> tuple[int, ...]:
    from .convert import expected_meta_shapes
    return expected_meta_shapes(args)[key]


# --- the groups: how rank-local tensors meet -------------------------------------------------------

class _EmulatedGroup:
    """Every rank in this process; lists hold one tensor per rank, reductions run in rank order."""

    def __init__(self, world: int):
        self.ranks = list(range(world))

    def all_reduce(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        total = parts[0].clone()
        for p in parts[1:]:
            total += p               # in the activation dtype, one rounding per rank, as the wire does
        return [total for _ in parts]

    def all_gather(self, parts: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
        full = torch.cat(parts, dim=dim)
        return [full for _ in parts]


class _DistGroup:
    """One rank of a torch.distributed process group."""

    def __init__(self, rank: int, world: int):
        self.ranks, self.world = [rank], world

    def all_reduce(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        x = parts[0].contiguous()
        torch.distributed.all_reduce(x)
        return [x]

    def all_gather(self, parts: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
        x = parts[0].contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        torch.distributed.all_gather(out, x)
        return [torch.cat(out, dim=dim)]


# --- the forward, once, over a group -----------------------------------------------------------------

class ParallelLlama:
    """The ranks of ``group`` with their shards; ``forward`` returns full float32 logits."""

    def __init__(self, args: ModelArgs, shards: list[dict[str, torch.Tensor]], world: int, group,
                 dtype: torch.dtype = torch.float32, device: str = "cpu"):
        check_degree(args, world)
        self.args, self.world, self.group, self.device = args, world, group, device
        self.w = [{k: v.to(device=device, dtype=dtype) for k, v in s.items() if k != "rope.freqs"} for s in shards]
        self.n_local_heads = args.n_heads // world
        self.n_local_kv = args.kv_heads // world
        self.freqs = precompute_freqs_cis(args.head_dim, 2 * args.max_seq_len, args.rope_theta).to(device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        norm = RMSNorm(weight.shape[0], self.args.norm_eps).to(x.device)
        norm.weight = torch.nn.Parameter(weight, requires_grad=False)
        return norm(x)

    def _attention(self, w: dict, prefix: str, x: torch.Tensor, freqs: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
        """One rank's heads; returns its partial wo product (to be all-reduced)."""
        bsz, seqlen, _ = x.shape
        hd = self.args.head_dim
        xq = F.linear(x, w[prefix + "wq.weight"]).view(bsz, seqlen, self.n_local_heads, hd)
        xk = F.linear(x, w[prefix + "wk.weight"]).view(bsz, seqlen, self.n_local_kv, hd)
        xv = F.linear(x, w[prefix + "wv.weight"]).view(bsz, seqlen, self.n_local_kv, hd)
        xq, xk = apply_rotary_emb(xq, xk, freqs)
        rep = self.n_local_heads // self.n_local_kv
        keys, values = repeat_kv(xk, rep), repeat_kv(xv, rep)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(hd)
        if mask is not None:
            scores = scores + mask
        up = torch.promote_types(xq.dtype, torch.float32)
        scores = F.softmax(scores.to(up), dim=-1).type_as(xq)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return F.linear(out, w[prefix + "wo.weight"])

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        _bsz, seqlen = tokens.shape
        g = self.group
        h = g.all_gather([F.embedding(tokens, w["tok_embeddings.weight"]) for w in self.w], dim=-1)
        if seqlen > self.freqs.shape[0]:
            self.freqs = precompute_freqs_cis(self.args.head_dim, seqlen, self.args.rope_theta).to(self.device)
        freqs = self.freqs[:seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=self.device).triu(1).type_as(h[0])
        for i in range(self.args.n_layers):
            p = f"layers.{i}."
            xn = [self._norm(x, w[p + "attention_norm.weight"]) for x, w in zip(h, self.w)]
            attn = g.all_reduce([self._attention(w, p + "attention.", x, freqs, mask) for x, w in zip(xn, self.w)])
            h = [x + a for x, a in zip(h, attn)]
            xn = [self._norm(x, w[p + "ffn_norm.weight"]) for x, w in zip(h, self.w)]
            ffn = g.all_reduce([
                F.linear(F.silu(F.linear(x, w[p + "feed_forward.w1.weight"])) * F.linear(x, w[p + "feed_forward.w3.weight"]),
                         w[p + "feed_forward.w2.weight"])
                for x, w in zip(xn, self.w)])
            h = [x + f for x, f in zip(h, ffn)]
        hn = [self._norm(x, w["norm.weight"]) for x, w in zip(h, self.w)]
        logits = g.all_gather([F.linear(x, w["output.weight"]) for x, w in zip(hn, self.w)], dim=-1)[0]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


# --- entry points ----------------------------------------------------------------------------------------

def emulated_logits(path: str | Path, tokens: torch.Tensor, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> torch.Tensor:
    """All k ranks of a k-shard Meta checkpoint in this process, reducing in rank order."""
    world = len(meta_shard_files(Path(path)))
    loaded = [load_rank(path, r, world) for r in range(world)]
    model = ParallelLlama(loaded[0][0], [s for _, s in loaded], world, _EmulatedGroup(world), dtype, device)
    return model.forward(tokens).cpu()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str, tokens: torch.Tensor, dtypes: list[torch.dtype],
            device: str, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    local = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        args, shard = load_rank(path, rank, world)
        results = {}
        for dtype in dtypes:
            model = ParallelLlama(args, [shard], world, _DistGroup(rank, world), dtype, local)
            results[str(dtype).removeprefix("torch.")] = model.forward(tokens).cpu()
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def distributed_logits(path: str | Path, tokens: torch.Tensor, dtypes=(torch.float32,), device: str = "cpu",
                       threads_per_rank: int = 1) -> dict[str, torch.Tensor]:
    """Spawn one process per shard (gloo on CPU, NCCL with one GPU per rank on CUDA), rendezvous on
    127.0.0.1, run Meta's model-parallel forward at each dtype; return rank 0's logits by dtype name.

    The ranks' all-reduce is the backend's own: for two ranks the sum is order-free, for more,
    gloo's ring reduces each chunk of the tensor starting at a different rank, so the emulation
    (rank order) agrees to within one rounding per row-parallel layer, not bit for bit.
    """
    path = Path(path)
    world = len(meta_shard_files(path))
    load_rank(path, 0, world)   # fail here, in the caller, on a bad checkpoint
    if device.startswith("cuda") and torch.cuda.device_count() < world:
        raise RuntimeError(f"model-parallel degree {world} needs {world} CUDA devices, "
                           f"found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="llama-mp-") as tmp:
        out = os.path.join(tmp, "logits.pt")
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(path), tokens.cpu(), list(dtypes),
                                                   device, out, threads_per_rank), nprocs=world, join=True)
        return torch.load(out, weights_only=True)

"""Llama 2, written from the paper and Meta's published numerics, in Meta's weight layout.

One file, one forward pass, readable in one sitting. Numerics follow Meta's llama code:
RMSNorm in float32 cast back to the activation dtype, RoPE as complex multiplication on
interleaved (even, odd) pairs in float32, GQA by repeating kv heads, softmax in float32,
SwiGLU, float32 logits. Two switches exist for the harness:

- ``rope_dtype``: float32 is Meta's choice; float64 gives the "exact math" oracle.
- ``compute_dtype``: the dtype of weights and activations (float64 for the oracle).

For padded batches the forward also takes an optional key mask (which positions hold real
tokens) and explicit positions per row; without them it is Meta's forward, unchanged.

The model never imports transformers, lm_eval or the harness.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None      # absent in params.json = n_heads (no GQA)
    vocab_size: int = -1                  # -1 = take it from the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 4096

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Read Meta's params.json dict as is; unknown keys are an error, not a silent drop."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise KeyError(f"unknown params.json key(s): {', '.join(unknown)}")
        return cls(**{**params, **overrides})

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "ModelArgs":
        return cls.from_params(json.loads(Path(path).read_text()), **overrides)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Meta's FFN sizing: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 at least (float64 stays float64), then back to the activation dtype *before*
        # the weight: this cast order is Meta's and differs from "weight * norm" in float32.
        up = torch.promote_types(x.dtype, torch.float32)
        return self._norm(x.to(up)).type_as(x) * self.weight


def precompute_freqs_cis(head_dim: int, end: int, theta: float,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Complex rotations e^{i m theta_j} for positions m < end; float32 angles as in Meta's code."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype)[: head_dim // 2] / head_dim))
    t = torch.arange(end, dtype=dtype)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate interleaved pairs (x[2j], x[2j+1]) as complex numbers, in freqs_cis' precision."""
    real = torch.promote_types(xq.dtype, freqs_cis.real.dtype)
    xq_ = torch.view_as_complex(xq.to(real).reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.to(real).reshape(*xk.shape[:-1], -1, 2))
    # (seq, hd/2): the same positions for every row; (bsz, seq, hd/2): positions per row (padding)
    rot = freqs_cis.view(-1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * rot).flatten(3)
    xk_out = torch.view_as_real(xk_ * rot).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bs, seq, n_kv, hd) -> (bs, seq, n_kv * n_rep, hd); kv head j serves q heads j*n_rep..."""
    if n_rep == 1:
        return x
    bs, seq, n_kv, hd = x.shape
    return x[:, :, :, None, :].expand(bs, seq, n_kv, n_rep, hd).reshape(bs, seq, n_kv * n_rep, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                mask: Optional[torch.Tensor], use_cache: bool) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        if use_cache:
            # Grow the cache as needed instead of Meta's fixed max_batch_size allocation.
            if self.cache_k is None or start_pos == 0:
                self.cache_k, self.cache_v = xk[:, :0], xv[:, :0]
            if self.cache_k.shape[1] != start_pos:
                raise ValueError(f"KV cache holds {self.cache_k.shape[1]} positions, start_pos={start_pos}")
            self.cache_k = torch.cat([self.cache_k, xk], dim=1)
            self.cache_v = torch.cat([self.cache_v, xv], dim=1)
            keys, values = self.cache_k, self.cache_v
        else:
            keys, values = xk, xv

        keys, values = repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        up = torch.promote_types(xq.dtype, torch.float32)
        scores = F.softmax(scores.to(up), dim=-1).type_as(xq)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)   # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)   # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, freqs_cis, mask, use_cache):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, use_cache)
        return h + self.feed_forward(self.ffn_norm(h))


def padding_mask(key_mask: torch.Tensor, seqlen: int, causal: Optional[torch.Tensor]) -> torch.Tensor:
    """(bsz, 1, seqlen, kvlen) additive mask: causal, and no query looks at a pad key.

    A pad query (left padding puts them first) would then see nothing and softmax would give
    NaN; it keeps the causal row instead. Its output is garbage either way and never compared.
    """
    bsz, kvlen = key_mask.shape
    allowed = key_mask.bool()[:, None, None, :].expand(bsz, 1, seqlen, kvlen)
    if causal is not None:
        allowed = allowed & torch.isfinite(causal)
    allowed = torch.where(allowed.any(-1, keepdim=True), allowed,
                          torch.ones_like(allowed) if causal is None else torch.isfinite(causal))
    zero = torch.zeros((), device=key_mask.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), device=key_mask.device))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, rope_dtype: torch.dtype = torch.float32):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (params.json's -1 means: take it from the tokenizer)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope_dtype = rope_dtype
        self._freqs: Optional[torch.Tensor] = None

    def freqs_cis(self, end: int, device: torch.device) -> torch.Tensor:
        # Meta precomputes 2 * max_seq_len positions; we grow on demand so long inputs work.
        if self._freqs is None or self._freqs.shape[0] < end or self._freqs.device != device:
            n = max(end, 2 * self.args.max_seq_len)
            self._freqs = precompute_freqs_cis(self.args.head_dim, n, self.args.rope_theta,
                                               self.rope_dtype).to(device)
        return self._freqs

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, use_cache: bool = False,
                return_hidden: bool = False, key_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None):
        """Logits (float32, or float64 when the model runs in float64) for tokens (bsz, seqlen).

        With ``use_cache`` the kv cache is extended from ``start_pos`` (incremental decoding).
        ``return_hidden`` also returns the residual stream after the embedding and each block.
        Padded batches: ``key_mask`` (bsz, start_pos + seqlen), true where a real token sits
        (cached positions included); ``positions`` (bsz, seqlen), each token's RoPE position.
        """
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        if positions is None:
            freqs_cis = self.freqs_cis(start_pos + seqlen, tokens.device)[start_pos: start_pos + seqlen]
        else:
            freqs_cis = self.freqs_cis(int(positions.max()) + 1, tokens.device)[positions]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu(1)
            # With a cache, new tokens see every cached position: pad the mask on the left.
            mask = torch.hstack([torch.zeros(seqlen, start_pos, device=tokens.device), mask]).type_as(h)
        if key_mask is not None:
            mask = padding_mask(key_mask.to(tokens.device), seqlen, mask).type_as(h)
        hidden = [h]
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask, use_cache)
            hidden.append(h)
        h = self.norm(h)
        logits = self.output(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return (logits, hidden) if return_hidden else logits

"""Per-layer and per-op capture for both subjects, through forward hooks only.

A *point* is ``(layer, op)``: ``layer`` counts from 0 as in the checkpoints' key names, or is
``None`` for the model-level ops ``embed``, ``norm`` (final RMSNorm) and ``head`` (logits).
Per block, in forward order:

    attn_norm  q  k  v  attn_weights  attn  attn_resid  mlp_norm  mlp  resid

``q``/``k`` are after RoPE, ``attn`` is the attention output after wo/o_proj, ``attn_resid`` the
residual stream after the attention add (the MLP norm's input, as the block computed it), ``resid``
the block's output. The four finer ops
(q, k, v, attn_weights) are captured only with ``fine=True``.

Both subjects hand every captured tensor to a ``sink(point, tensor)`` in one common layout:
activations (batch, seq, ...), q/k/v (batch, seq, heads, head_dim) in Meta's *interleaved*
RoPE pair order (transformers' rotate_half halves are re-interleaved here), attention weights
(batch, heads, seq, seq). A sink can store (the oracle) or compare on the fly (the subjects),
so a full model never has to keep every activation of three runs in memory.

Neither model's code is edited: the reference's post-RoPE q/k are recomputed from the input of
its Attention module with reference_model.model's own functions, transformers' from the input
of its attention module with its own ``apply_rotary_pos_emb``.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from reference_model.model import apply_rotary_emb, repeat_kv

Point = tuple[Optional[int], str]
Sink = Callable[[Point, torch.Tensor], None]

BLOCK_OPS = ("attn_norm", "q", "k", "v", "attn_weights", "attn", "attn_resid", "mlp_norm", "mlp", "resid")
FINE_OPS = ("q", "k", "v", "attn_weights")
# The coarse family of each op, for the summary's readers who want attn/mlp/norm/embed/head.
GROUP = {"embed": "embed", "norm": "norm", "head": "head", "attn_norm": "norm", "mlp_norm": "norm",
         "q": "attn", "k": "attn", "v": "attn", "attn_weights": "attn", "attn": "attn",
         "attn_resid": "attn", "mlp": "mlp", "resid": "mlp"}


def point_order(n_layers: int, fine: bool = True) -> list[Point]:
    """Every point in forward order: the order in which 'first' is meant."""
    ops = [op for op in BLOCK_OPS if fine or op not in FINE_OPS]
    return [(None, "embed")] + [(i, op) for i in range(n_layers) for op in ops] + [(None, "norm"), (None, "head")]


def point_name(point: Point) -> str:
    layer, op = point
    return op if layer is None else f"layers.{layer}.{op}"


def _causal_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) in float32 at least; q, k (b, seq, heads, hd)."""
    up = torch.promote_types(q.dtype, torch.float32)
    n_rep = q.shape[2] // k.shape[2]
    qt, kt = q.transpose(1, 2).to(up), repeat_kv(k, n_rep).transpose(1, 2).to(up)
    scores = qt @ kt.transpose(2, 3) / math.sqrt(q.shape[-1])
    seq = q.shape[1]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return F.softmax(scores, dim=-1)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class Capture:
    """Hooks on a model (or on standalone blocks); ``remove()`` or use as a context manager."""

    def __init__(self, sink: Sink, fine: bool = False):
        self.sink, self.fine = sink, fine
        self._handles: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _emit(self, point: Point, t: torch.Tensor) -> None:
        self.sink(point, t.detach())

    def _on(self, module, point: Point) -> None:
        self._handles.append(module.register_forward_hook(lambda m, a, out: self._emit(point, _first(out))))

    def _block_common(self, block, layer: int, attn_module, mlp_norm) -> None:
        self._on(attn_module, (layer, "attn"))
        # The residual stream after the attention add is what the MLP's norm receives: captured
        # there, as the block computed it (a bug in the add itself then shows at attn_resid).
        self._handles.append(mlp_norm.register_forward_pre_hook(
            lambda m, args: self._emit((layer, "attn_resid"), args[0])))
        self._on(block, (layer, "resid"))

    # --- the reference ---------------------------------------------------------------------------

    def reference_block(self, block, layer: int) -> "Capture":
        self._on(block.attention_norm, (layer, "attn_norm"))
        if self.fine:
            self._handles.append(block.attention.register_forward_pre_hook(
                lambda m, args: self._reference_qkv(m, layer, *args[:3])))
        self._block_common(block, layer, block.attention, block.ffn_norm)
        self._on(block.ffn_norm, (layer, "mlp_norm"))
        self._on(block.feed_forward, (layer, "mlp"))
        return self

    def _reference_qkv(self, attn, layer: int, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor) -> None:
        b, s, _ = x.shape
        xq = attn.wq(x).view(b, s, attn.n_heads, attn.head_dim)
        xk = attn.wk(x).view(b, s, attn.n_kv_heads, attn.head_dim)
        xv = attn.wv(x).view(b, s, attn.n_kv_heads, attn.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        self._emit((layer, "q"), xq)
        self._emit((layer, "k"), xk)
        self._emit((layer, "v"), xv)
        if start_pos == 0:
            self._emit((layer, "attn_weights"), _causal_weights(xq, xk).type_as(xq))

    def reference(self, model, layers: Optional[Iterable[int]] = None) -> "Capture":
        """Hooks on a reference_model.model.Transformer."""
        self._on(model.tok_embeddings, (None, "embed"))
        for i, block in enumerate(model.layers):
            if layers is None or i in layers:
                self.reference_block(block, i)
        self._on(model.norm, (None, "norm"))
        self._on(model.output, (None, "head"))
        return self

    # --- transformers ----------------------------------------------------------------------------

    def transformers_block(self, layer_module, layer: int) -> "Capture":
        self._on(layer_module.input_layernorm, (layer, "attn_norm"))
        attn = layer_module.self_attn
        if self.fine:
            self._handles.append(attn.register_forward_pre_hook(
                lambda m, args, kwargs: self._transformers_qkv(m, layer, args, kwargs), with_kwargs=True))
            self._handles.append(attn.register_forward_hook(
                lambda m, a, out: self._transformers_weights(layer, out)))
        self._block_common(layer_module, layer, attn, layer_module.post_attention_layernorm)
        self._on(layer_module.post_attention_layernorm, (layer, "mlp_norm"))
        self._on(layer_module.mlp, (layer, "mlp"))
        return self

    def _transformers_qkv(self, attn, layer: int, args, kwargs) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        b, s, _ = h.shape
        hd = attn.head_dim
        q = attn.q_proj(h).view(b, s, -1, hd).transpose(1, 2)
        k = attn.k_proj(h).view(b, s, -1, hd).transpose(1, 2)
        v = attn.v_proj(h).view(b, s, -1, hd)
        q, k = _transformers_rope(attn, q, k, v.transpose(1, 2), kwargs)
        q, k = _interleave(q.transpose(1, 2)), _interleave(k.transpose(1, 2))
        self._emit((layer, "q"), q)
        self._emit((layer, "k"), k)
        self._emit((layer, "v"), v)
        self._pending_qk = (q, k)
        # Releases before 5 (4.46) return eager's weights only when asked; asking changes nothing
        # else for eager (for sdpa it would switch kernels, so sdpa is never asked).
        # A release without _attn_implementation (before 4.36) has eager only.
        if "output_attentions" in inspect.signature(attn.forward).parameters and \
                getattr(attn.config, "_attn_implementation", "eager") == "eager":
            return args, {**kwargs, "output_attentions": True}
        return None

    def _transformers_weights(self, layer: int, out) -> None:
        # eager returns its own weights (so a mask bug shows); sdpa and friends return None,
        # and then the weights are recomputed from q/k with a plain causal mask.
        weights = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
        q, k = self._pending_qk
        if weights is None:
            weights = _causal_weights(q, k).type_as(q)
        self._emit((layer, "attn_weights"), weights)

    def transformers(self, model, layers: Optional[Iterable[int]] = None) -> "Capture":
        """Hooks on a transformers LlamaForCausalLM."""
        self._on(model.model.embed_tokens, (None, "embed"))
        for i, layer_module in enumerate(model.model.layers):
            if layers is None or i in layers:
                self.transformers_block(layer_module, i)
        self._on(model.model.norm, (None, "norm"))
        self._on(model.lm_head, (None, "head"))
        return self


def _transformers_rope(attn, q, k, v, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (batch, heads, seq, head_dim) after RoPE, as this release's attention module applies it.

    Release adapter: from 4.44 (checked: 4.44, 4.45, 4.46, 4.48, 5.x) the model hands every
    attention ``position_embeddings`` (cos, sin). Before, the attention computes them from
    ``position_ids`` with its own ``rotary_emb``: 4.38-4.43 call it with position_ids; 4.31-4.37
    with a length, and ``apply_rotary_pos_emb`` indexes the tables by position_ids. Asked of what
    the call carries and of the signatures, not of the version number.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    if kwargs.get("position_embeddings") is not None:
        cos, sin = kwargs["position_embeddings"]
        return apply_rotary_pos_emb(q, k, cos, sin)
    position_ids, rotary = kwargs["position_ids"], attn.rotary_emb
    if "position_ids" in inspect.signature(rotary.forward).parameters:
        cos, sin = rotary(v, position_ids)
        return apply_rotary_pos_emb(q, k, cos, sin)
    cos, sin = rotary(v, seq_len=q.shape[2])       # no cache here: the keys are the queries' positions
    return apply_rotary_pos_emb(q, k, cos, sin, position_ids)


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """rotate_half layout (first half = real parts, second = imaginary) -> Meta's (re, im) pairs."""
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)


def rel_l2(subject: torch.Tensor, truth: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU; inf when the subject is not finite or its shape
    differs (a head that drops vocabulary rows diverges there, whatever its values)."""
    a = subject.detach().to("cpu", torch.float64)
    b = truth.detach().to("cpu", torch.float64)
    if a.shape != b.shape or not torch.isfinite(a).all():
        return math.inf
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


class Store:
    """A sink that keeps every point (float64, CPU): the truth the subjects are measured against."""

    def __init__(self):
        self.points: dict[Point, torch.Tensor] = {}

    def __call__(self, point: Point, t: torch.Tensor) -> None:
        self.points[point] = t.to("cpu", torch.float64)


class Errors:
    """A sink that measures each point against a Store as it arrives and keeps only the number."""

    def __init__(self, truth: Store):
        self.truth = truth
        self.errors: dict[Point, float] = {}

    def __call__(self, point: Point, t: torch.Tensor) -> None:
        if point in self.truth.points:
            self.errors[point] = rel_l2(t, self.truth.points[point])

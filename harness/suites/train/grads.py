"""Loss and every parameter's gradient, by autograd, for the oracle, the reference and transformers.

Gradients are handed back in Meta's names and layout (q/k rows unpermuted), in float64 on the CPU,
so that every subject is compared tensor by tensor with the oracle's.

The reference model's forward is decorated with ``torch.inference_mode`` (it serves inference
everywhere else); training calls the undecorated function, ``Transformer.forward.__wrapped__``, so
the reference itself stays exactly as written and backpropagates unchanged.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness.core.subjects import DTYPES, padded_positions
from harness.suites.train.batches import IGNORE, Batch
from reference_model.convert import hf_to_meta_key, unpermute
from reference_model.model import Transformer

_train_forward = Transformer.forward.__wrapped__     # the forward without inference_mode

#: GradScaler's default initial scale, and how often it may back off (halve) on non-finite gradients
INIT_SCALE = 2.0 ** 16
BACKOFFS = 24


@dataclass
class Grads:
    loss: float
    grads: dict[str, torch.Tensor]              # Meta name -> float64 CPU tensor (unscaled)
    scale: float | None = None                  # the loss scale the gradients were taken at
    nonfinite: str = ""                         # why the loss or a gradient is not finite ('' when all are)
    extra: dict = field(default_factory=dict)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross entropy over labelled positions after the shift (position t predicts label t+1),
    on logits upcast to float32 at least."""
    up = torch.promote_types(logits.dtype, torch.float32)
    shift = logits[:, :-1].to(up).reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift, target, ignore_index=IGNORE, reduction="sum")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each labelled token's cross entropy (the terms ``token_loss_sum`` adds), float64 on the CPU, in
    row-major order of the labelled positions: the same order for a padded batch and its rows alone."""
    up = torch.promote_types(logits.dtype, torch.float32)
    shift = logits.detach()[:, :-1].to(up).reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1).to(logits.device)
    keep = target != IGNORE
    return F.cross_entropy(shift[keep], target[keep], reduction="none").to("cpu", torch.float64)


def autocast(dtype: str | None, device: str):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


# --- the reference (and, in float64, the oracle) -----------------------------------------------------

def oracle_grads(model: Transformer, batch: Batch, device: str) -> Grads:
    """The truth: each row alone at its real positions in float64 (RoPE angles too), the per-token
    mean over the whole batch, backpropagated through the unmodified reference."""
    model.zero_grad(set_to_none=True)
    n = batch.tokens()
    total, terms = 0.0, []
    for ids, labels in batch.rows():
        logits = _train_forward(model, ids[None].to(device))
        loss = token_loss_sum(logits, labels[None]) / n
        loss.backward()
        total += float(loss.detach())
        terms.append(token_losses(logits, labels[None]))
    return Grads(total, _reference_grads(model, 1.0), extra={"token_losses": torch.cat(terms)})


def reference_grads(model: Transformer, batch: Batch, device: str, cast_dtype: str | None = None,
                    scaled: bool = False) -> Grads:
    """The reference at its working dtype on the padded batch as a whole (key mask, positions over
    the real tokens), optionally under autocast and with a dynamic loss scale."""
    ids, mask = batch.ids.to(device), batch.mask.to(device)
    kwargs = {"key_mask": mask, "positions": padded_positions(mask)} if batch.padded else {}
    n = batch.tokens()
    terms = []

    def step(scale: float):
        model.zero_grad(set_to_none=True)
        with autocast(cast_dtype, device):
            logits = _train_forward(model, ids, **kwargs)
            loss = token_loss_sum(logits, batch.labels) / n
        terms.append(token_losses(logits, batch.labels))
        (loss * scale).backward()
        return float(loss.detach())

    got = _scaled(step, lambda s: _reference_grads(model, s), scaled)
    got.extra["token_losses"] = terms[-1]
    return got


def _reference_grads(model: Transformer, scale: float) -> dict[str, torch.Tensor]:
    return {k: _unscale(p.grad, scale, p) for k, p in model.named_parameters()}


# --- transformers ------------------------------------------------------------------------------------

def transformers_grads(model, batch: Batch, device: str, cast_dtype: str | None = None, scaled: bool = False,
                       fault=None, labels: torch.Tensor | None = None) -> Grads:
    """transformers' LlamaForCausalLM in train mode as a fine-tuning loop calls it: input_ids,
    attention_mask and labels in, ``outputs.loss`` backpropagated (under autocast and a dynamic loss
    scale where the cell says so). A planted fault may rewrite the labels or the loss."""
    model.train()
    ids, mask = batch.ids.to(device), batch.mask.to(device)
    labels = (batch.labels if labels is None else labels).clone()
    if fault is not None and hasattr(fault, "train_labels"):
        labels = fault.train_labels(labels, batch)
    labels = labels.to(device)
    own_loss = fault is not None and hasattr(fault, "train_loss")
    n = int((labels[:, 1:] != IGNORE).sum())
    of_logits = []

    def step(scale: float):
        model.zero_grad(set_to_none=True)
        with autocast(cast_dtype, device):
            out = model(input_ids=ids, attention_mask=mask, labels=None if own_loss else labels, use_cache=False)
            loss = fault.train_loss(out.logits, labels, model) if own_loss else out.loss
        # the per-token mean cross entropy of the logits it returned, in float64: what the loss must equal
        of_logits.append(float(token_loss_sum(out.logits.detach().double(), labels) / max(n, 1)))
        (loss * scale).backward()
        return float(loss.detach())

    try:
        got = _scaled(step, lambda s: hf_grads(model, s), scaled)
        got.extra["loss_of_logits"] = of_logits[-1]
        return got
    finally:
        model.zero_grad(set_to_none=True)


def hf_grads(model, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """transformers' parameter gradients in Meta's names and layout (q/k rows unpermuted)."""
    return hf_tensors(model, lambda p: _unscale(p.grad, scale, p))


def hf_tensors(model, get) -> dict[str, torch.Tensor]:
    """get(parameter) of every transformers parameter, float64 on the CPU, in Meta's names and layout."""
    c = model.config
    out = {}
    for name, p in model.named_parameters():
        key = hf_to_meta_key(name)
        g = get(p).to("cpu", torch.float64)
        if key.endswith("attention.wq.weight"):
            g = unpermute(g, c.num_attention_heads)
        elif key.endswith("attention.wk.weight"):
            g = unpermute(g, c.num_key_value_heads)
        out[key] = g
    return out


# --- loss scaling ------------------------------------------------------------------------------------

def _unscale(grad: torch.Tensor | None, scale: float, p: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU, divided by the loss scale; a parameter autograd never reached has 0."""
    if grad is None:
        return torch.zeros(p.shape, dtype=torch.float64)
    g = grad.detach().to("cpu", torch.float64)
    return g / scale if scale != 1.0 else g


def _finite(loss: float, grads: dict[str, torch.Tensor]) -> str:
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    return f"non-finite gradient in {len(bad)} tensor(s), first {bad[0]}" if bad else ""


def _scaled(step, collect, scaled: bool) -> Grads:
    """One backward; with ``scaled``, as torch.amp.GradScaler does: the loss times a scale starting at
    2^16, halved and retried while any gradient overflows (the step GradScaler would skip)."""
    scale = INIT_SCALE if scaled else 1.0
    for _ in range(BACKOFFS if scaled else 1):
        loss = step(scale)
        grads = collect(scale)
        why = _finite(loss, grads)
        if not why or not scaled or not math.isfinite(loss):
            break
        scale /= 2.0
    return Grads(loss, grads, scale if scaled else None, why)

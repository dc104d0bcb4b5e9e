#!/usr/bin/env python3
"""Which call order leaves LoRA without gradients under gradient checkpointing, in the installed
transformers + peft (the facts behind the museum entry lora-reentrant-gc-after-wrap, docs/history.md).

    [VENV/bin/]python scripts/peft_gc_orders.py

A 2-layer random Llama (no download, no weights), peft LoRA on q/v/down with B non-zero, one
forward and backward per case: checkpointing off; enabled before or after get_peft_model; torch's
default (what `gradient_checkpointing_enable()` does without kwargs), reentrant or non-reentrant
(n/a where the release has no gradient_checkpointing_kwargs); with or without an explicit
enable_input_require_grads(). Prints, per case, whether the loss has a graph and how many adapter
tensors got no gradient. A probe, not a verdict: the judged check is `llama-parity train --inputs lora`.
"""
from __future__ import annotations

import inspect
import warnings
from importlib.metadata import version

import torch


def build():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def wrap(model):
    from peft import LoraConfig, get_peft_model
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():                 # peft's B = 0 would leave every A without gradient anyway
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return wrapped


def checkpointing(model, kind: str) -> str:
    """Enable checkpointing as a user would; '' or why this release cannot."""
    if kind == "default":
        model.gradient_checkpointing_enable()
        return ""
    if "gradient_checkpointing_kwargs" not in inspect.signature(model.gradient_checkpointing_enable).parameters:
        return "no gradient_checkpointing_kwargs in this release"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": kind == "reentrant"})
    return ""


def case(ids, order: str, kind: str, input_grads: bool) -> str:
    model = build()
    why = ""
    if order == "before":
        why = checkpointing(model, kind)
        model = wrap(model)
    elif order == "after":
        model = wrap(model)
        why = checkpointing(model, kind)
    else:
        model = wrap(model)
    if why:
        return f"n/a ({why})"
    if input_grads:
        model.enable_input_require_grads()
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    hint = "; torch warned 'None of the inputs have requires_grad=True'" if any(
        "None of the inputs have requires_grad" in str(w.message) for w in caught) else ""
    if not loss.requires_grad:
        return f"loss has no grad_fn: backward raises, no adapter gets a gradient{hint}"
    loss.backward()
    adapters = [p for p in model.parameters() if p.requires_grad]
    lost = sum(p.grad is None or not bool(p.grad.any()) for p in adapters)
    return f"{lost} of {len(adapters)} adapter tensors without gradient{hint}"


def main() -> int:
    print(f"transformers {version('transformers')}, peft {version('peft')}, torch {torch.__version__}")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    print(f"{'checkpointing':14s} {'enabled':14s} {'input hook':11s} result")
    print(f"{'off':14s} {'-':14s} {'-':11s} {case(ids, 'none', 'default', False)}")
    for kind in ("default", "reentrant", "non-reentrant"):
        for order in ("before", "after"):
            for hook in (False, True):
                print(f"{kind:14s} {order + ' wrap':14s} {'explicit' if hook else 'no':11s} {case(ids, order, kind, hook)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""transformers' LlamaForCausalLM, as a user loads it (``harness.core.subjects.load_transformers``),
behind the Subject protocol; optionally compiled, decoding through a StaticCache, or quantised in
place (torchao.py, quanto.py build on the class here).

    --subject transformers                        today's subject: eager attention, tp 1
    --subject transformers:attn=sdpa,tp=2
    --subject transformers:compile=1              torch.compile (inductor) of the forward
    --subject transformers:cache=static,compile=1 StaticCache and a compiled decode, as generate() does
    --subject transformers:gguf=F32               the llama.cpp converter's GGUF, read back with gguf_file=

``settings()`` of the plain subject are exactly the case keys the logits rows have today
(dtype, attn, tp); a variant adds its own (compile, cache), so its cells never share a key with
the plain ones.
"""
from __future__ import annotations

import gc
from typing import Any

import torch

from harness.core import compat
from harness.core.errors import InputError
from harness.core.inputs import KNOWN_ATTN
from harness.core.subjects import DTYPES, TransformersSteps, load_transformers, padded_positions, transformers_decode
from harness.subjects import IMPLICIT, Source, register
from harness.subjects.common import Options, package_versions
from harness.subjects.compiled import BACKENDS, CompiledForward

KIND = "transformers"
CACHES = ("dynamic", "static")


class TransformersLM:
    """One loaded LlamaForCausalLM. ``inference=False`` runs under no_grad instead of
    inference_mode, for tensor subclasses that cannot take inference tensors (quanto's int4)."""

    name = KIND
    exact = True        # float32 arithmetic on the checkpoint's weights: the logits rule judges it
    implicit_positions = True   # a mask alone: position_ids left to the release (0..n-1 over the row)

    def __init__(self, source: Source, dtype: str, device: str, attn: str = "eager", tp: int = 1,
                 fault=None, cache: str = "dynamic", inference: bool = True, quantization_config=None,
                 device_map=None, offload_folder=None):
        if dtype not in DTYPES:
            raise InputError(f"--subject {self.name}: dtype {dtype!r} (known: {', '.join(DTYPES)})")
        self.dtype, self.device, self.attn, self.tp = dtype, device, attn, tp
        self.fault, self.cache, self.inference = fault, cache, inference
        self.compiled: CompiledForward | None = None
        self.model = load_transformers("LlamaForCausalLM", source.hf_path(), dtype, device, attn, fault,
                                       device_map=device_map, offload_folder=offload_folder,
                                       quantization_config=quantization_config, pretraining_tp=tp)

    # -- the protocol ------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "attn": self.attn, "tp": self.tp}
        if self.compiled is not None:
            out["compile"] = self.compiled.backend
        if self.cache != "dynamic":
            out["cache"] = self.cache
        return out

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **package_versions("torch", "transformers"),
            "weights": "HF folder written by the harness's converter (q/k permuted), loaded with from_pretrained",
            "attn_implementation": getattr(self.model.config, "_attn_implementation", self.attn),
            "pretraining_tp": self.tp, "kv_cache": f"{self.cache} ({self.dtype})",
        }
        if self.compiled is not None:
            out["compile"] = self.compiled.provenance()
        if self.fault is not None:
            out["plant"] = self.fault.name
        return out

    def cannot(self) -> dict[str, str]:
        out = {}
        if self.cache == "static" and compat.transformers_version() < (4, 41):
            out["decode"] = (f"transformers {compat.transformers_release()} takes a StaticCache only through "
                             "generate(cache_implementation='static') (from 4.41 as past_key_values)")
        if self.compiled is not None:
            out["hooks"] = (f"compiled with torch.compile ({self.compiled.backend}): per-layer captures "
                            "(localise) would run the eager model, not the compiled graph")
            out["module"] = out["train"] = (f"compiled with torch.compile ({self.compiled.backend}) for inference: "
                                            "a cast or a backward through its module would not judge the compiled graph")
            out["place"] = (f"compiled with torch.compile ({self.compiled.backend}): place judges the model accelerate "
                            "dispatched, which the compiled forward was not built from")
        return out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every position; with a mask, left-padded rows at their own positions (as the
        logits suite's padded cell and generate() call it)."""
        ids = ids.to(self.device)
        kwargs: dict[str, Any] = {"use_cache": False}
        if mask is not None:
            positions = padded_positions(mask) if positions is None else positions
            kwargs["attention_mask"] = mask.to(self.device)
        if isinstance(positions, str) and positions == IMPLICIT:
            positions = None
        elif positions is not None:
            kwargs["position_ids"] = positions.to(self.device)
        if mask is None and "position_ids" not in kwargs and self.fault is not None:
            kwargs.update(self.fault.forward_kwargs(ids))
        with self.no_grad():
            return self.model(input_ids=ids, **kwargs).logits

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        """A prefill, then one token per step through the model's own cache (harness.core.subjects)."""
        why = self.cannot().get("decode")
        if why:
            raise NotImplementedError(why)
        run = transformers_decode if self.inference else transformers_decode.__wrapped__   # no inference_mode
        with self.no_grad():
            return run(self.model, ids.to(self.device), prefill, self.cache)

    def add_pad_token(self) -> tuple[int, torch.Tensor]:
        """The documented recipe for a pad token: a new id, embeddings resized, ``padding_idx`` on
        its zero row. The new id, and the row it embeds to (zeros when the recipe holds)."""
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self.model.resize_token_embeddings(vocab + 1)
        self.model.config.pad_token_id = vocab
        emb = self.model.get_input_embeddings()
        emb.padding_idx = vocab
        with torch.no_grad():
            emb.weight[vocab].zero_()
        return vocab, emb(torch.tensor([vocab], device=emb.weight.device))

    def open_cache(self, batch: int, length: int):
        """Its own cache fed a few tokens per call (generation): a callable, next ids -> their logits."""
        why = self.cannot().get("decode")
        if why:
            raise NotImplementedError(why)
        steps = TransformersSteps(self.model, batch, length, self.cache)

        def call(ids: torch.Tensor) -> torch.Tensor:
            with self.no_grad():
                return steps(ids.to(self.device))
        return call

    def module(self) -> torch.nn.Module:
        """The loaded LlamaForCausalLM itself: what axes casts and calls with transformers' own flags,
        what the train suite backpropagates through and what localise hooks ("module", "train", "hooks")."""
        why = self.cannot().get("module")
        if why:
            raise NotImplementedError(why)
        return self.model

    def dequantised(self) -> dict[str, torch.Tensor] | None:
        """Meta-layout float weights the subject actually computes with, when they differ from the
        checkpoint's (quantised subjects); None here: transformers holds the checkpoint's weights."""
        return None

    def close(self) -> None:
        self.model = None
        gc.collect()

    # -- variants ----------------------------------------------------------------------------
    def compile(self, backend: str) -> None:
        self.compiled = CompiledForward(self.model, backend)

    def no_grad(self):
        return torch.inference_mode() if self.inference else torch.no_grad()


def common_options(o: Options, kind: str) -> dict[str, Any]:
    """attn, tp, cache and plant: what every subject built on a transformers model takes; and the
    placement the place command hands over (``device_map``, ``offload_folder``; never key=value)."""
    from harness.core.faults import Fault, get_subject_fault
    attn = o.choice("attn", KNOWN_ATTN, "eager")
    tp = o.integer("tp", 1)
    cache = o.choice("cache", CACHES, "dynamic")
    plant = o.text("plant")
    # a suite's --plant arrives as the Fault it already checked for itself (behaviour's faults are
    # not the logits suite's); a spec's plant=NAME is checked here
    fault = plant if isinstance(plant, Fault) else get_subject_fault(plant, kind, o.label) if plant else None
    placement = {k: v for k in ("device_map", "offload_folder")
                 if (v := o.internal(k, "the place command (--device-map, --offload-dir)")) is not None}
    return {"attn": attn, "tp": tp, "cache": cache, "fault": fault, **placement}


def transformers_layers(source, dtype: str, device: str, options: dict):
    """Its decoder layers one block at a time, for stream (harness/subjects/layers.py)."""
    from harness.subjects.layers import transformers_layers as layers
    return layers(source, dtype, device, options)


@register(KIND, axes=("attn", "tp", "cache"), offers=("module", "train", "hooks", "place"), layers=transformers_layers)
def transformers_subject(source: Source, dtype: str, device: str, options: dict) -> TransformersLM:
    o = Options(KIND, options)
    common = common_options(o, KIND)
    compiled = o.flag("compile")
    backend = o.choice("backend", BACKENDS, "inductor")
    gguf = o.text("gguf")
    o.done()
    if gguf is not None:
        cache = common.pop("cache")
        if compiled or cache != "dynamic":
            raise InputError(f"--subject {o.label}: gguf= takes attn=, tp= and plant= only (no compile or cache)")
        from harness.subjects.transformers_gguf import load
        return load(source, dtype, device, gguf, **common)
    if "backend" in options and not compiled:
        raise InputError(f"--subject {o.label}: backend= needs compile=1")
    subject = TransformersLM(source, dtype, device, **common)
    if compiled:
        subject.compile(backend)
    return subject

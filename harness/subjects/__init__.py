"""Subjects as a parameter: every implementation judged against the float64 oracle has this shape.

A *subject* maps token ids to a next-token distribution at every position: transformers at some
setting, llama.cpp at some quantisation, ONNX Runtime, a compiled graph. Suites are written once
and loop over subjects; nothing in ``harness/suites`` names an implementation. A subject says once
what it cannot do (``cannot``) and the cells that would need it are n/a with that reason.

    --subject KIND[:key=value,...]      e.g. llama.cpp:quant=Q8_0,kv=f16   transformers:compile=1

One module per implementation in this package registers a factory under its kind with
``@register("KIND")``; the factory gets the weights (``Source``), the working dtype and device and
the spec's options, and returns a ``Subject``. What a subject needs built or converted (an HF
folder, a GGUF file, an ONNX graph, a native library) it builds through ``Source``, cached under
``Source.cache`` keyed by the weights' fingerprint and the tool's version.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from harness.core.errors import InputError

# What a subject may be unable to do; the suites ask for these by name.
CAPABILITIES = (
    "padding",      # forward with an attention mask and explicit positions (left-padded rows)
    "decode",       # its own KV cache: a prefill, then one token per step
    "hooks",        # per-layer / per-op captures (localisation, streaming)
    "logits",       # raw logits (else: log-probabilities over the full vocabulary)
    "planting",     # the harness's planted faults can be applied to it
)


@runtime_checkable
class Subject(Protocol):
    name: str                     # the kind, as rows and reports say: "transformers", "llama.cpp", ...

    def settings(self) -> dict[str, Any]:
        """What distinguishes this cell: dtype, attn, tp, quant, kv, compile, ... (plain values)."""

    def provenance(self) -> dict[str, Any]:
        """Where the numbers come from: package versions, build and SIMD flags, KV-cache dtype,
        quantisation type and how many tensors fell back to another type."""

    def cannot(self) -> dict[str, str]:
        """capability (CAPABILITIES, or "dtype:float64" and the like) -> why this subject cannot."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq, vocab) logits (or full-vocabulary log-probabilities where ``cannot`` says
        "logits"), float32 or wider, on the caller's device, for every position."""

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        """The same through its own cache: ``prefill`` tokens at once, then one token per step."""

    def close(self) -> None:
        """Free what it holds (models, processes, temporary files)."""


@dataclass
class Source:
    """The weights every subject of a run is built from, and where builds are cached."""
    ckpt: Any                               # reference_model.checkpoint.Checkpoint (Meta layout)
    fingerprint: str                        # content hash of the weights (cache key)
    hf_path: Callable[[], Path]             # the HF folder the harness converted (made on first call)
    tokenizer: Path | None                  # tokenizer.model, when one is at hand
    cache: Path                             # harness.core.cache_dir() / "subjects"


@dataclass(frozen=True)
class Spec:
    kind: str
    options: dict[str, str] = field(default_factory=dict)

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{opts}" if opts else self.kind


Factory = Callable[[Source, str, str, dict], Subject]    # (source, dtype, device, options)
KINDS: dict[str, Factory] = {}
_SPEC = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)(?::(.*))?$")


def register(kind: str) -> Callable[[Factory], Factory]:
    def put(factory: Factory) -> Factory:
        KINDS[kind] = factory
        return factory
    return put


def parse_spec(text: str, arg: str = "--subject") -> Spec:
    """KIND[:key=value,...]; a bad spelling is exit 2 naming the argument."""
    m = _SPEC.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise InputError(f"{arg} {text!r}: expected KIND[:key=value,...], e.g. llama.cpp:quant=Q8_0")
    options: dict[str, str] = {}
    for item in filter(None, (m.group(2) or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise InputError(f"{arg} {text!r}: {item!r} is not key=value")
        if key.strip() in options:
            raise InputError(f"{arg} {text!r}: {key.strip()} given twice")
        options[key.strip()] = value.strip()
    return Spec(m.group(1), options)

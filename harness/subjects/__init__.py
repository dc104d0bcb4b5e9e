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
    "hooks",        # per-layer / per-op captures on its own module (localise; ``module()`` hooked)
    "module",       # its own torch module (``module()``), called as transformers' LlamaForCausalLM (axes)
    "train",        # autograd through that module in train mode: loss, gradients, steps (train)
    "logits",       # raw logits (else: log-probabilities over the full vocabulary)
    "planting",     # the harness's planted faults can be applied to it
    "resize",       # a token added to its vocabulary (embeddings resized), as the docs advise for <pad>
    "place",        # loaded with accelerate's device_map and offload folder, its blocks across devices (place)
    "stream",       # its decoder layers built one block's weights at a time (stream; LAYERS)
    "subject",      # the subject itself: its package is not installed here (NOT_INSTALLED's reason)
)
NOT_INSTALLED = "subject"   # cannot()[NOT_INSTALLED]: how to install it; every cell of it is n/a


class NotInstalledError(InputError):
    """A factory asked for a kind whose package is absent. Alone (a test, a benchmark) it is bad
    input, exit 2; a suite running several subjects records the kind's cells n/a with this reason."""


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
        "logits"), float32 or wider, on the caller's device, for every position. A mask without
        positions: positions counted over real tokens. ``positions=IMPLICIT`` (only where the subject
        has ``implicit_positions``): whatever the implementation does when handed a mask alone."""

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        """The same through its own cache: ``prefill`` tokens at once, then one token per step."""

    def close(self) -> None:
        """Free what it holds (models, processes, temporary files)."""

    # Optional: ``open_cache(batch, length)`` -> a callable feeding its own cache the next ids and
    # returning their logits (generation, which picks each next token itself); see ``steps``.
    # Optional: ``module()`` -> its loaded torch module, for the kinds that offer "module" (below).


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


DEFAULT = "transformers"    # the subject a suite judges when no --subject is given (today's runs)
IMPLICIT = "implicit"       # forward(positions=IMPLICIT): the implementation's own default positions
Factory = Callable[[Source, str, str, dict], Subject]    # (source, dtype, device, options)
KINDS: dict[str, Factory] = {}
# The matrix axes a kind takes as options (attn, tp: the logits suite's; cache: the behaviour cache
# suite's): a spec that does not fix one runs at each of the suite's values; a kind without an axis
# has "-" there.
AXES: dict[str, tuple[str, ...]] = {}
# What a kind can offer at all, known before one is built (building may mean converting or
# compiling): a command that needs one of these refuses the other kinds with exit 2. An instance
# may still lack it for its options (a compiled forward, quantised weights): its ``cannot()`` says why.
OFFERS: dict[str, frozenset[str]] = {}
# A kind that offers "stream" also registers how its decoder layers are built one block at a time
# (harness/subjects/layers.py): (source: LazyWeights, dtype, device, options) -> its Layers.
LAYERS: dict[str, Callable] = {}
# Where each kind registers itself: imported only when the kind is asked for, so that naming one
# subject never imports another's packages (torchao changes every `import transformers`).
MODULES = {"transformers": "transformers", "torchao": "torchao", "quanto": "quanto",
           "bitsandbytes": "bnb", "onnxruntime": "onnx", "onnxruntime-genai": "ortgenai", "llama.cpp": "llamacpp",
           "vllm": "vllm", "torchtune": "torchtune", "llama-models": "llama_models", "gptq": "gptq"}
_SPEC = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)(?::(.*))?$")


def register(kind: str, axes: tuple[str, ...] = (), offers: tuple[str, ...] = (),
             layers: Callable | None = None) -> Callable[[Factory], Factory]:
    """``@register(KIND, axes, offers, layers)`` on a kind's factory; ``layers``, its decoder layers
    built one block at a time, makes it offer "stream"."""
    def put(factory: Factory) -> Factory:
        KINDS[kind] = factory
        AXES[kind] = tuple(axes)
        OFFERS[kind] = frozenset(offers) | ({"stream"} if layers is not None else set())
        if layers is not None:
            LAYERS[kind] = layers
        return factory
    return put


def load_kinds(*kinds: str) -> list[str]:
    """Import the modules that register ``kinds`` (every kind when none is named); the known kinds."""
    import importlib
    for kind in kinds or tuple(MODULES):
        if kind not in KINDS and kind in MODULES:
            importlib.import_module(f"{__name__}.{MODULES[kind]}")
    return sorted(set(KINDS) | set(MODULES))


def factory(spec: Spec, arg: str = "--subject") -> Factory:
    """The registered factory of a spec's kind; an unknown kind is exit 2 naming the argument."""
    known = load_kinds(spec.kind)
    if spec.kind not in KINDS:
        raise InputError(f"{arg} {spec.label()!r}: unknown kind {spec.kind!r} (known: {', '.join(known)})")
    return KINDS[spec.kind]


class _Dry(Exception):
    """The stand-in weights of ``check_options`` were reached for: the factory has read its options."""


class _DrySource:
    def __getattr__(self, name: str):
        raise _Dry(name)


def check_options(spec: Spec, dtype: str, device: str) -> None:
    """A spec's options read by its factory as a build reads them, stopping the moment it reaches for
    the weights (a stand-in Source), so that a bad option is exit 2 before a command writes anything.
    An absent package, or anything else the factory meets before the weights, is left to the run."""
    try:
        factory(spec)(_DrySource(), dtype, device, dict(spec.options))
    except NotInstalledError:
        return
    except InputError:
        raise
    except Exception:   # _Dry above all: the options were read and found good
        return


def add_offering(p, command: str, needs: str, own: str = "") -> None:
    """--subject on a command that judges one subject through something only some kinds offer."""
    p.add_argument("--subject", action="append", metavar="KIND[:key=value,...]",
                   help=f"the subject judged (default {DEFAULT}): a kind that offers {needs}; "
                        f"another kind is exit 2 naming the kinds that do"
                        + (f"; {own} come from this command's own flags" if own else ""))


def offering(texts: list[str] | None, command: str, capability: str, needs: str,
             own: tuple[str, ...] = ()) -> Spec:
    """The one --subject of a command that needs ``capability`` of its subject (the default kind when
    none is given): exit 2 for an unknown kind, a kind that does not offer it (naming the kinds that
    do), or an option the command sets with its own flags (``own``). A matrix axis (``AXES``: tp,
    attn, cache) counts as a capability of the kinds that take it."""
    specs = [parse_spec(t) for t in texts or [DEFAULT]]
    if len(specs) > 1:
        raise InputError(f"--subject: {command} judges one subject at a time")
    spec = specs[0]
    factory(spec)                            # an unknown kind: exit 2 naming it

    def offers(kind: str) -> bool:
        return capability in OFFERS.get(kind, ()) or capability in AXES.get(kind, ())
    if not offers(spec.kind):
        load_kinds()
        able = sorted(k for k in KINDS if offers(k))
        raise InputError(f"--subject {spec.label()}: {command} needs {needs}, which {spec.kind} cannot give "
                         f"(kinds that can: {', '.join(able) or 'none'})")
    taken = sorted(set(spec.options) & set(own))
    if taken:
        raise InputError(f"--subject {spec.label()}: {command} sets {', '.join(taken)} with its own flags "
                         f"({command} --help), not key=value")
    return spec


def unable(subject: Subject, capability: str) -> str:
    """Why a built subject cannot do ``capability`` ('' when it can): what it says of itself, else a
    kind that registered without offering it."""
    return subject.cannot().get(capability) or (
        "" if capability in OFFERS.get(subject.name, ()) else f"{subject.name} does not offer {capability!r}")


class Cannot(Exception):
    """A built subject cannot do what a cell needs, at its options: the cell is n/a with this reason."""


def built(spec: Spec, source: Source, dtype: str, device: str, cell: dict, capability: str) -> Subject:
    """``spec`` built for one cell (``cell``: the command's own options, e.g. attn, tp and the planted
    Fault, on top of the spec's), or Cannot(why) where at those options it lacks ``capability``."""
    subject = factory(spec)(source, dtype, device, {**spec.options, **cell})
    why = unable(subject, capability)
    if why:
        subject.close()
        raise Cannot(why)
    return subject


def module_of(spec: Spec, source: Source, dtype: str, device: str, cell: dict, capability: str = "module"):
    """The torch module of ``spec`` built for one cell, or Cannot(why) (``built``)."""
    return built(spec, source, dtype, device, cell, capability).module()


def steps(subject: Subject, batch: int, length: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """How generation drives a subject one token at a time: its own cache where it has one
    (``open_cache``), else the whole sequence run again for each new token (the same distribution,
    without a cache's arithmetic); and, for the record, which of the two and why."""
    why = subject.cannot().get("decode") or ("" if hasattr(subject, "open_cache") else
                                             f"{subject.name} offers no incremental cache here")
    if not why:
        return subject.open_cache(batch, length), "own KV cache"
    held: list[torch.Tensor] = []

    def again(ids: torch.Tensor) -> torch.Tensor:
        held.append(ids.cpu())
        whole = torch.cat(held, dim=1)
        return subject.forward(whole)[:, -ids.shape[1]:]
    return again, f"whole sequence per token ({why})"


def is_exact(subject: Subject) -> bool:
    """Exact subjects (float32 arithmetic on the checkpoint's own weights) are judged like
    transformers; the others are lossy and judged against per-type budgets. A subject says which
    with ``exact``; one that does not say is taken as lossy (a budget must vouch for it)."""
    return bool(getattr(subject, "exact", False))


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

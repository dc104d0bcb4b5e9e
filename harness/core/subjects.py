"""Subjects: things that map token ids to logits. The reference (at any dtype, or as the float64
oracle) and transformers' Llama classes loaded from the same weights, as a user would load them.

Every transformers model of every suite is loaded by ``load_transformers``, so a planted fault
(harness.core.faults) is applied the same way everywhere.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness.core import compat
from reference_model.checkpoint import Checkpoint, build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
ORACLE = "oracle-fp64"
TRUTH = ("oracle-fp64: the reference run entirely in float64, RoPE angles included "
         "(exact math; Meta's own code and transformers compute the angles in float32)")


def reference(ckpt: Checkpoint, dtype: str, device: str):
    """The reference Transformer at dtype with Meta's float32 RoPE angles; float64 is the oracle
    (angles in float64 too)."""
    rope = torch.float64 if dtype == "float64" else torch.float32
    return build_model(ckpt, DTYPES[dtype], device, rope_dtype=rope)


class ReferenceSubject:
    """The independent reference. ``oracle=True``: float64 everywhere, RoPE angles included."""

    def __init__(self, ckpt: Checkpoint, dtype: str, device: str, oracle: bool = False):
        self.name = ORACLE if oracle else "reference"
        rope = torch.float64 if oracle else torch.float32
        self.model = build_model(ckpt, DTYPES[dtype], device, rope_dtype=rope)
        self.device = device

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device))

    # -- the Subject protocol (harness.subjects), so that adapters (bench's) take either ---------
    def settings(self) -> dict:
        return {"dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")}

    def provenance(self) -> dict:
        return {"implementation": "reference_model (independent, pure torch)", "torch": torch.__version__,
                "rope_angles": "float64" if self.name == ORACLE else "float32"}

    def cannot(self) -> dict[str, str]:
        return {}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(ids.to(self.device), key_mask=None if mask is None else mask.to(self.device),
                          positions=None if positions is None else positions.to(self.device))

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        return reference_decode(self.model, ids.to(self.device), prefill)

    def open_cache(self, batch: int, length: int) -> "ReferenceSteps":
        return ReferenceSteps(self.model, self.device)

    def close(self) -> None:
        self.model = None


class ReferenceSteps:
    """The reference's own KV cache fed a few tokens at a time: each call returns those tokens'
    logits (a prefill, then one token per step, as generation calls it)."""

    def __init__(self, model, device: str):
        self.model, self.device, self.pos = model, device, 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids.to(self.device), start_pos=self.pos, use_cache=True)
        self.pos += ids.shape[1]
        return out


def load_transformers(kind: str, hf_path: Path, dtype: str, device: str, attn: str = "eager", fault=None,
                      device_map=None, max_memory=None, offload_folder=None, gguf_file: str | None = None,
                      quantization_config=None, **config_edits):
    """transformers' ``kind`` (LlamaForCausalLM, LlamaModel, ...) loaded with from_pretrained as a
    user would. ``config_edits`` are set on the config first, then the fault edits the config and,
    once loaded, the model. ``device_map`` (with ``max_memory``, ``offload_folder``) is passed
    through: accelerate places the model, and ``device`` is then not applied. ``gguf_file``: a GGUF
    in ``hf_path`` read instead of the safetensors (config and weights, dequantised by transformers).
    ``quantization_config`` (bitsandbytes'): the weights are quantised as they load, placed on
    ``device`` by a device map (a 4-bit or 8-bit model refuses ``.to()``)."""
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # our own bars count cells; one bar per load is noise
    hf_logging.set_verbosity_error()    # e.g. "newly initialised score weights": expected, we set them
    gguf = {"gguf_file": gguf_file} if gguf_file is not None else {}
    config = transformers.LlamaConfig.from_pretrained(hf_path, **gguf)
    for k, v in config_edits.items():
        setattr(config, k, v)
    if fault is not None:
        fault.edit_config(config)
    kwargs = {"config": config, **gguf}
    version = compat.transformers_version()
    if version >= (4, 36) and compat.transformers_release() not in ("4.36.0", "4.36.1"):
        # 4.36.0-4.36.1 hand attn_implementation on to the model's __init__ when a config is
        # passed too (TypeError); the config below carries it there
        kwargs["attn_implementation"] = attn
    if (4, 36) <= version < (4, 46):
        # 4.36-4.38 (at least) drop attn_implementation="eager" when a config is passed too (the
        # config already *reads* "eager" by default) and then pick SDPA: set it on the config.
        config._attn_implementation = attn
    kwargs[compat.dtype_kwarg()] = DTYPES[dtype]
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        device_map = {"": device} if device_map is None else device_map
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    model = getattr(transformers, kind).from_pretrained(hf_path, **kwargs)
    model = (model if device_map is not None else model.to(device)).eval()
    loaded = getattr(model.config, "_attn_implementation", "eager")
    if loaded != attn:   # never report one implementation's numbers under another's name
        raise RuntimeError(f"asked for attn_implementation={attn!r}, transformers loaded {loaded!r}")
    if fault is not None:
        fault.edit_model(model)
    return model


class TransformersSubject:
    """transformers' LlamaForCausalLM loaded with from_pretrained, as a user would load it."""

    name = "transformers"

    def __init__(self, hf_path: Path, dtype: str, device: str, attn: str = "eager", tp: int = 1, fault=None,
                 device_map=None, max_memory=None, offload_folder=None):
        self.model = load_transformers("LlamaForCausalLM", hf_path, dtype, device, attn, fault, device_map,
                                       max_memory, offload_folder, pretraining_tp=tp)
        self.device, self.fault = device, fault

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        kwargs = {"use_cache": False}
        if self.fault is not None:
            kwargs.update(self.fault.forward_kwargs(ids))
        return self.model(input_ids=ids, **kwargs).logits


# --- the ways a user calls a model: whole, padded in a batch, one token at a time -----------------

def reference_decode(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """The reference's own KV cache: a prefill of ``prefill`` tokens, then one token per step."""
    steps = [model(ids[:, :prefill], start_pos=0, use_cache=True)]
    for t in range(prefill, ids.shape[1]):
        steps.append(model(ids[:, t:t + 1], start_pos=t, use_cache=True))
    return torch.cat(steps, dim=1)


class TransformersSteps:
    """transformers' KV cache as a user drives it outside generate(): each call feeds the next
    tokens and returns their logits, feeding back the cache each step returns (4.31 has only
    tuples, and 4.38 copies a DynamicCache it is given into a new one; later releases update it in
    place). ``length``: the most positions a StaticCache must hold."""

    def __init__(self, model, batch: int, length: int, kind: str = "dynamic"):
        self.model, self.kind, self.pos = model, kind, 0
        self.cache = None if kind == "dynamic" and compat.legacy_cache() else compat.make_cache(model, kind, batch, length)
        self.name = compat.cache_kwarg(model)
        # With a StaticCache the caller says where each step writes (cache_position), as generate() does.
        self.where = kind == "static" and compat.forward_takes(model, "cache_position")

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        start, end = self.pos, self.pos + ids.shape[1]
        kw = {"cache_position": torch.arange(start, end, device=ids.device)} if self.where else {}
        out = self.model(input_ids=ids, use_cache=True, **{self.name: self.cache}, **kw)
        if self.kind == "dynamic":
            self.cache = out.past_key_values   # a StaticCache is the caller's, written in place
        self.pos = end
        return out.logits


@torch.inference_mode()
def transformers_decode(model, ids: torch.Tensor, prefill: int, kind: str = "dynamic") -> torch.Tensor:
    """transformers' KV cache (TransformersSteps): a prefill, then one token per step."""
    steps = TransformersSteps(model, *ids.shape, kind)
    return torch.cat([steps(ids[:, :prefill])] + [steps(ids[:, t:t + 1]) for t in range(prefill, ids.shape[1])],
                     dim=1)


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (as generate() does); pads get 0, never compared."""
    return (mask.cumsum(-1) - 1).clamp_min(0)

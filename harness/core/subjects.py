"""Subjects: things that map token ids to logits. The reference (at any dtype, or as the float64
oracle) and transformers' LlamaForCausalLM loaded from the same weights.

What the installed transformers offers (attention implementations, a live ``pretraining_tp``)
is asked here, once, so that a case it cannot run is recorded as not applicable with the reason.
"""
from __future__ import annotations

import inspect
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from reference_model.checkpoint import Checkpoint, build_model, save_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class ReferenceSubject:
    """The independent reference. ``oracle=True``: float64 everywhere, RoPE angles included."""

    def __init__(self, ckpt: Checkpoint, dtype: str, device: str, oracle: bool = False,
                 device_map: dict | None = None, offload_dir: str | Path | None = None):
        self.name = "oracle-fp64" if oracle else "reference"
        rope = torch.float64 if oracle else torch.float32
        # With a device map the weights are built on the CPU and accelerate places them (harness/placement.py).
        self.model = build_model(ckpt, DTYPES[dtype], "cpu" if device_map else device, rope_dtype=rope)
        if device_map:
            from harness.scale.place import place_reference
            place_reference(self.model, device_map, offload_dir)
        self.device = device

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device))


# --- transformers --------------------------------------------------------------------------------

def transformers_version() -> tuple[int, ...]:
    import transformers
    return tuple(int(p) for p in transformers.__version__.split(".")[:2])


@lru_cache(maxsize=None)
def tp_honoured() -> bool:
    """Whether this release's Llama MLP slices by pretraining_tp (4.31-4.46; a no-op from 4.47)."""
    from transformers.models.llama import modeling_llama
    return "pretraining_tp" in inspect.getsource(modeling_llama.LlamaMLP.forward)


@lru_cache(maxsize=None)
def attn_implementations(device: str) -> dict[str, str]:
    """Attention implementation -> '' when usable here, else the reason it is not."""
    version = transformers_version()
    out = {"eager": ""}
    out["sdpa"] = "" if version >= (4, 36) else f"transformers {version} has no SDPA path for Llama"
    try:
        import flash_attn  # noqa: F401
        has_fa = True
    except ImportError:
        has_fa = False
    if not device.startswith("cuda"):
        out["flash_attention_2"] = "needs a CUDA device"
    elif not has_fa:
        out["flash_attention_2"] = "the flash_attn package is not installed"
    else:
        out["flash_attention_2"] = ""
    out["flex_attention"] = "" if version >= (4, 48) else "flex attention arrives in transformers 4.48"
    return out


def load_transformers(kind: str, hf_path: Path, dtype: str, device: str, attn: str = "eager",
                      edit_config=None, device_map=None, max_memory=None, offload_folder=None, **config_edits):
    """transformers' ``kind`` (LlamaForCausalLM, LlamaModel, ...) loaded with from_pretrained as a
    user would. ``config_edits`` are set on the config first, then ``edit_config(config)`` runs.
    ``device_map`` (with ``max_memory``, ``offload_folder``) is passed through: accelerate places
    the model, and ``device`` is then not applied."""
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # our own bars count cells; one bar per load is noise
    hf_logging.set_verbosity_error()    # e.g. "newly initialised score weights": expected, we set them
    config = transformers.LlamaConfig.from_pretrained(hf_path)
    for k, v in config_edits.items():
        setattr(config, k, v)
    if edit_config is not None:
        edit_config(config)
    kwargs = {"config": config}
    if transformers_version() >= (4, 36):
        kwargs["attn_implementation"] = attn
    if (4, 36) <= transformers_version() < (4, 46):
        # 4.36-4.38 (at least) drop attn_implementation="eager" when a config is passed too (the
        # config already *reads* "eager" by default) and then pick SDPA: set it on the config.
        config._attn_implementation = attn
    kwargs["dtype" if transformers_version() >= (4, 56) else "torch_dtype"] = DTYPES[dtype]
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    model = getattr(transformers, kind).from_pretrained(hf_path, **kwargs)
    model = (model if device_map is not None else model.to(device)).eval()
    loaded = getattr(model.config, "_attn_implementation", "eager")
    if loaded != attn:   # never report one implementation's numbers under another's name
        raise RuntimeError(f"asked for attn_implementation={attn!r}, transformers loaded {loaded!r}")
    return model


class TransformersSubject:
    """transformers' LlamaForCausalLM loaded with from_pretrained, as a user would load it."""

    name = "transformers"

    def __init__(self, hf_path: Path, dtype: str, device: str, attn: str = "eager", tp: int = 1, fault=None,
                 device_map=None, max_memory=None, offload_folder=None):
        edit = fault.edit_config if fault is not None else None
        self.model = load_transformers("LlamaForCausalLM", hf_path, dtype, device, attn, edit, device_map,
                                       max_memory, offload_folder, pretraining_tp=tp)
        self.device, self.fault = device, fault
        if fault is not None:
            fault.edit_model(self.model)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        kwargs = {"use_cache": False}
        if self.fault is not None:
            kwargs.update(self.fault.forward_kwargs(ids))
        return self.model(input_ids=ids, **kwargs).logits


class HFFolder:
    """An HF folder for transformers: the user's own, or one converted from a Meta checkpoint by
    the harness's converter (the same conversion a user would run) into a temporary folder."""

    def __init__(self, ckpt: Checkpoint):
        self._tmp = None
        if ckpt.source == "hf":
            self.path = ckpt.path
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="llama-parity-hf-")
            self.path = save_hf(Path(self._tmp.name) / "hf", ckpt.args, ckpt.state)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

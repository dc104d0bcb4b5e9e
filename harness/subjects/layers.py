"""What a kind that offers "stream" gives the stream command: its decoder layers built one block's
weights at a time, never the whole model (harness/scale/stream.py).

    layers = LAYERS[kind](source, dtype, device, options)     # source: a LazyWeights of the checkpoint
    args, kwargs = layers.call(h)                             # how its model calls a layer, for inputs h
    module = layers.layer(i, hf_state)                        # block i from its HF-layout tensors
    norm = layers.norm(weight)                                # the final norm

The transformers kind's layers are the installed release's own ``LlamaDecoderLayer`` and
``LlamaRMSNorm``. Between 4.31 and 5.x the layer's constructor (no layer_idx in 4.31), the
arguments its forward takes (position_ids only in 4.31; cache_position; position_embeddings from
4.44), the causal mask (4D additive in 4.31, ``_update_causal_mask`` in 4.38-4.4x,
masking_utils in 5.x; SDPA sometimes None) and where RoPE's tables live all changed. So none of
that is rebuilt here: the release's own ``LlamaModel`` is run once with a stand-in for its first
layer that records the call, and every streamed layer is called the same way. A kind built on
transformers' model (torchao, quanto) quantises each layer as it is built (``finish``).
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from typing import Any

import torch

from harness.subjects.common import Options, package_versions


@contextmanager
def parameters_on_meta():
    """Modules built inside get meta parameters (nothing allocated, loaded later with assign=True)
    but real buffers: RoPE's tables (and 4.38's causal-mask table) are computed as the release
    computes them, which building on the meta device would leave empty."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class _LayerCall(Exception):
    """Raised by the stand-in first layer with the arguments LlamaModel passed it."""

    def __init__(self, args, kwargs):
        super().__init__("recorded")
        self.args, self.kwargs = args, kwargs


class _Recorder(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise _LayerCall(args, kwargs)


def hf_config(source, attn: str, fault=None):
    """The LlamaConfig of a checkpoint (Meta's params.json converted, or its config.json)."""
    from transformers import LlamaConfig

    from reference_model.checkpoint import read_json
    from reference_model.convert import args_to_hf_config
    cfg = args_to_hf_config(source.args) if source.format == "meta" else read_json(source.path / "config.json")
    config = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("llama_parity")})
    config._attn_implementation = attn
    if fault is not None:
        fault.edit_config(config)
    return config


class TransformersLayers:
    """transformers' decoder layers, one block at a time; a planted fault edits the config and each layer."""

    name = "transformers"
    exact = True

    def __init__(self, source, dtype: str, device: str, attn: str, fault=None):
        self.dtype, self.device, self.attn, self.fault = dtype, device, attn, fault
        self.config = hf_config(source, attn, fault)

    def call(self, h: torch.Tensor) -> tuple[tuple, dict]:
        """(args after hidden_states, kwargs) the installed LlamaModel passes its decoder layers for
        inputs_embeds h: the mask, positions, RoPE tables, cache flags, in this release's format."""
        from transformers.models.llama.modeling_llama import LlamaModel
        one = copy.deepcopy(self.config)
        one.num_hidden_layers = 1
        with parameters_on_meta():
            model = LlamaModel(one)
        model.layers[0] = _Recorder()
        for m in model.modules():       # buffers (RoPE, mask tables) to h's device; parameters stay meta
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.to(h.device)
        try:
            model.eval()(inputs_embeds=h, use_cache=False)
        except _LayerCall as call:
            args, kwargs = call.args, dict(call.kwargs)
            kwargs.pop("hidden_states", None)
            return args[1:], kwargs
        raise RuntimeError("transformers' LlamaModel never called its first decoder layer")

    def layer(self, i: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Decoder layer ``i`` from its tensors in HF layout (names inside the layer)."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        # 4.31 takes no layer_idx (4.36 does).
        extra = (i,) if "layer_idx" in inspect.signature(LlamaDecoderLayer.__init__).parameters else ()
        with parameters_on_meta():
            module = LlamaDecoderLayer(self.config, *extra)
        module.load_state_dict(state, strict=False, assign=True)
        leftover = [n for n, p in module.named_parameters() if p.is_meta]
        if leftover:
            raise RuntimeError(f"transformers layer {i}: parameters not loaded: {leftover}")
        module = module.to(self.device).eval()
        if self.fault is not None:
            self.fault.edit_layer(module, self.config)
        return self.finish(module)

    def finish(self, module: torch.nn.Module) -> torch.nn.Module:
        """What a kind does to each layer once built (a quantising kind quantises it)."""
        return module

    def norm(self, weight: torch.Tensor) -> torch.nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        norm = LlamaRMSNorm(weight.shape[0], eps=self.config.rms_norm_eps).to(self.device)
        norm.weight = torch.nn.Parameter(weight.to(self.device, _dtype(self.dtype)), requires_grad=False)
        return norm

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "attn": self.attn}

    def provenance(self) -> dict[str, Any]:
        return {**package_versions("torch", "transformers"),
                "layers": "LlamaDecoderLayer built from one block's tensors at a time, called as LlamaModel calls it",
                **({"plant": self.fault.name} if self.fault is not None else {})}


def _dtype(name: str) -> torch.dtype:
    from harness.core.subjects import DTYPES
    return DTYPES[name]


def layer_options(kind: str, options: dict) -> tuple[Options, dict]:
    """attn and plant (the stream command's own, or a spec's plant= of a fault that can be streamed);
    the caller reads its kind's own options, then ``done()``: what only a whole model takes (tp,
    cache, compile, gguf) is an unknown option here, exit 2."""
    from harness.core.errors import InputError
    from harness.core.faults import Fault, get_fault
    from harness.core.inputs import KNOWN_ATTN
    o = Options(kind, options)
    attn = o.choice("attn", KNOWN_ATTN, "eager")
    plant = o.text("plant")
    try:
        fault = plant if isinstance(plant, Fault) else get_fault(plant, "stream", kind) if plant else None
    except InputError as e:
        raise InputError(f"--subject {o.label}: {e}") from None
    return o, {"attn": attn, "fault": fault}


def transformers_layers(source, dtype: str, device: str, options: dict) -> TransformersLayers:
    o, common = layer_options("transformers", options)
    o.done()
    return TransformersLayers(source, dtype, device, **common)

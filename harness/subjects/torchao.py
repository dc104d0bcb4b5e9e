"""torchao's int8 quantisation of a transformers Llama, as torchao's README deploys it:
``quantize_(model, Int8WeightOnlyConfig())`` on the model from_pretrained loaded.

    --subject torchao:quant=int8wo     int8 weights (per output channel), float activations
    --subject torchao:quant=int8dyn    int8 weights and int8 activations quantised per token at run time
    --subject torchao:quant=int8wo,head=1   the output head quantised too

Every nn.Linear of the decoder blocks is quantised; the output head is kept in float unless
``head=1`` (transformers' TorchAoConfig keeps it by default: the vocabulary projection is where
a quantised head costs most), the embedding and the norms are not Linear layers and stay float.
``dequantised()`` gives the weights torchao computes with, for the error split.
"""
from __future__ import annotations

from typing import Any

import torch

from harness.subjects import Source, register
from harness.subjects.common import Options, meta_state, package_versions, require
from harness.subjects.layers import TransformersLayers, layer_options
from harness.subjects.transformers import TransformersLM, common_options

KIND = "torchao"
QUANTS = {"int8wo": "Int8WeightOnlyConfig", "int8dyn": "Int8DynamicActivationInt8WeightConfig"}


def is_quantised(weight: torch.Tensor) -> bool:
    """A weight replaced by a quantised tensor subclass (torchao's or quanto's)."""
    return type(weight.data if isinstance(weight, torch.nn.Parameter) else weight) is not torch.Tensor \
        and hasattr(weight, "dequantize")


def linear_census(model, kept: set[str]) -> dict[str, Any]:
    """How many Linear weights were quantised, kept in float by choice, or fell back to float."""
    quantised, fell_back = [], []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or name in kept or "embed" in name:
            continue
        (quantised if is_quantised(weight) else fell_back).append(name)
    return {"quantised": len(quantised), "kept_float": sorted(kept), "fell_back": fell_back,
            "quantised_types": sorted({type(getattr(model.get_submodule(n), "weight")).__name__ for n in quantised})}


def dequantised_hf_state(model) -> dict[str, torch.Tensor]:
    """Every parameter as the float tensor the model computes with (quantised ones dequantised)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.dequantize() if is_quantised(p) else p
    return out


class QuantisedLM(TransformersLM):
    """A transformers model quantised in place; its kind's faults edit it once quantised."""

    quant = ""
    head = False
    exact = False       # quantised weights: a budget judges it, with the error split

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "quant": self.quant, "attn": self.attn}
        if self.tp != 1:
            out["tp"] = self.tp
        if self.head:
            out["head"] = "quantised"
        if self.cache != "dynamic":
            out["cache"] = self.cache
        return out

    def kept(self) -> set[str]:
        return set() if self.head else {"lm_head"}

    def finish(self) -> None:
        self.census = linear_census(self.model, self.kept())
        if self.fault is not None and hasattr(self.fault, "edit_built"):
            self.fault.edit_built(self.model)

    def dequantised(self) -> dict[str, torch.Tensor]:
        return meta_state(dequantised_hf_state(self.model), self.args)


class TorchaoLM(QuantisedLM):
    name = KIND

    def __init__(self, source: Source, dtype: str, device: str, quant: str, head: bool, **common):
        super().__init__(source, dtype, device, **common)
        self.quant, self.head, self.args = quant, head, source.ckpt.args
        quantise_linears(self.model, quant, self.kept())
        self.finish()

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), **package_versions("torchao"),
                "quantisation": {"config": QUANTS[self.quant], "granularity": "per output channel (weights)"
                                 + (", per token (activations, at run time)" if self.quant == "int8dyn" else ""),
                                 **self.census}}


def quantise_linears(module: torch.nn.Module, quant: str, kept: set[str] = frozenset()) -> None:
    from torchao.quantization import quantize_
    import torchao.quantization as q
    quantize_(module, getattr(q, QUANTS[quant])(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn not in kept)


class TorchaoLayers(TransformersLayers):
    """Its decoder layers one block at a time, each quantised as it is built (stream): the same
    per-channel quantisation of the same Linear layers as the whole model's."""
    name, exact = KIND, False

    def __init__(self, source, dtype: str, device: str, quant: str, **common):
        super().__init__(source, dtype, device, **common)
        self.quant = quant

    def finish(self, module):
        quantise_linears(module, self.quant)
        return module

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "quant": self.quant}

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), **package_versions("torchao"), "quantisation": {"config": QUANTS[self.quant]}}


def torchao_layers(source, dtype: str, device: str, options: dict) -> TorchaoLayers:
    o, common = layer_options(KIND, options)
    quant = o.choice("quant", tuple(QUANTS), "int8wo")
    o.done()
    require(o.label, "torchao", "torchao", "torchao")
    return TorchaoLayers(source, dtype, device, quant, **common)


@register(KIND, axes=("attn", "tp", "cache"), offers=("hooks",), layers=torchao_layers)
def torchao_subject(source: Source, dtype: str, device: str, options: dict) -> TorchaoLM:
    o = Options(KIND, options)
    quant = o.choice("quant", tuple(QUANTS), "int8wo")
    head = o.flag("head")
    common = common_options(o, KIND)
    o.done()
    require(o.label, "torchao", "torchao", "torchao")
    return TorchaoLM(source, dtype, device, quant, head, **common)

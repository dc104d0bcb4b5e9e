"""optimum-quanto's weight quantisation of a transformers Llama, as its README deploys it:
``quantize(model, weights=qint8); freeze(model)``.

    --subject quanto:weights=int8      int8 weights, one scale per output channel
    --subject quanto:weights=int4      int4 weights in groups of 128 along the input, scale and shift per group

Every nn.Linear is quantised except the output head (``head=1`` quantises it too); activations
stay float. Runs under torch.no_grad, not inference_mode: quanto 0.2.7's int4 weights raise
"Cannot set version_counter for inference tensor" there (measured), which is itself a thing a
user of ``torch.inference_mode`` would meet.
"""
from __future__ import annotations

from typing import Any

from harness.subjects import Source, register
from harness.subjects.common import Options, package_versions, require
from harness.subjects.layers import TransformersLayers, layer_options
from harness.subjects.torchao import QuantisedLM
from harness.subjects.transformers import common_options

KIND = "quanto"
WEIGHTS = ("int8", "int4")


class QuantoLM(QuantisedLM):
    name = KIND

    def __init__(self, source: Source, dtype: str, device: str, weights: str, head: bool, **common):
        super().__init__(source, dtype, device, inference=False, **common)
        from optimum.quanto import freeze, qint4, qint8, quantize
        self.quant, self.head, self.args = weights, head, source.ckpt.args
        quantize(self.model, weights=qint8 if weights == "int8" else qint4, exclude=sorted(self.kept()) or None)
        freeze(self.model)
        self.finish()

    def provenance(self) -> dict[str, Any]:
        group = "one scale per output channel" if self.quant == "int8" else \
            "groups of 128 inputs, a scale and a shift each"
        return {**super().provenance(), **package_versions("optimum-quanto"),
                "quantisation": {"weights": f"q{self.quant}", "granularity": group, "activations": "float",
                                 "grad_mode": "no_grad (int4 cannot run under inference_mode)", **self.census}}


class QuantoLayers(TransformersLayers):
    """Its decoder layers one block at a time, each quantised and frozen as it is built (stream)."""
    name, exact = KIND, False

    def __init__(self, source, dtype: str, device: str, weights: str, **common):
        super().__init__(source, dtype, device, **common)
        self.weights = weights

    def finish(self, module):
        from optimum.quanto import freeze, qint4, qint8, quantize
        quantize(module, weights=qint8 if self.weights == "int8" else qint4)
        freeze(module)
        return module

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "quant": self.weights}

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), **package_versions("optimum-quanto"), "quantisation": {"weights": f"q{self.weights}"}}


def quanto_layers(source, dtype: str, device: str, options: dict) -> QuantoLayers:
    o, common = layer_options(KIND, options)
    weights = o.choice("weights", WEIGHTS, "int8")
    o.done()
    require(o.label, "optimum.quanto", "optimum-quanto", "quanto")
    return QuantoLayers(source, dtype, device, weights, **common)


@register(KIND, axes=("attn", "tp", "cache"), offers=("hooks",), layers=quanto_layers)
def quanto_subject(source: Source, dtype: str, device: str, options: dict) -> QuantoLM:
    o = Options(KIND, options)
    weights = o.choice("weights", WEIGHTS, "int8")
    head = o.flag("head")
    common = common_options(o, KIND)
    o.done()
    require(o.label, "optimum.quanto", "optimum-quanto", "quanto")
    return QuantoLM(source, dtype, device, weights, head, **common)

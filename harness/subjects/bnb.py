"""bitsandbytes' quantisation of a transformers Llama, loaded as the Llama 2 resources and the
QLoRA recipe load it: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``.

    --subject bitsandbytes                                   NF4 4-bit weights, compute in the run's dtype
    --subject bitsandbytes:quant=nf4,double=1,compute=bfloat16   the QLoRA base (double quantisation, bf16 compute)
    --subject bitsandbytes:quant=fp4
    --subject bitsandbytes:quant=int8                        LLM.int8(): int8 weights, outlier columns in float16

The weights are quantised as they load (blocks of 64 for 4-bit, one scale per row for int8); the
output head stays float (transformers' integration leaves the output embedding out by default).
bitsandbytes 0.50 runs every one of these on a CPU, so on CPU they are measured, not n/a.

Two things are handled here, so that the numbers are the wheel's own and the log stays readable:
on a CPU with AVX512-BF16, importing bitsandbytes fetches a 4-bit GEMM kernel from the Hugging Face Hub (``kernels.get_kernel``);
the import is made here with that fetch blocked, so nothing is downloaded at run time and the
provenance says which kernel ran. And LLM.int8() warns on every call that it casts float32
inputs to float16 (a log line): the cast is recorded once in the provenance and the line silenced.

``dequantised()`` gives the weights as they were quantised, for the error split. What the runtime
adds: on a CPU with AVX512-BF16 every 4-bit call goes through a fused kernel that casts the
activations to bfloat16 and the absmaxes too (runtime share 1e-5 whatever the compute dtype);
LLM.int8() quantises activations per token and keeps the batch's outlier columns in float16, so
its prefill and its one-token decode differ (the ``cached`` input shows it).
"""
from __future__ import annotations

import copy
import importlib
import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from harness.core.errors import InputError
from harness.subjects import Source, register
from harness.subjects.common import Options, meta_state, package_versions, require
from harness.subjects.transformers import TransformersLM, common_options

KIND = "bitsandbytes"
QUANTS = ("nf4", "fp4", "int8")
COMPUTE = ("float32", "bfloat16", "float16")


def import_bitsandbytes():
    """bitsandbytes, imported with its Hub kernel fetch blocked (see the module's docstring)."""
    if "bitsandbytes" not in sys.modules:
        saved = sys.modules.get("kernels", None)
        had = "kernels" in sys.modules
        sys.modules["kernels"] = None            # `from kernels import get_kernel` raises ImportError
        quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = quiet.level
        quiet.setLevel(logging.ERROR)            # its "failed to load from kernels-community"
        try:
            importlib.import_module("bitsandbytes")
        finally:
            quiet.setLevel(level)
            if had:
                sys.modules["kernels"] = saved
            else:
                del sys.modules["kernels"]
    import bitsandbytes
    return bitsandbytes


def cpu_kernel(linears: dict) -> str:
    """Which 4-bit GEMM the CPU runs. On a CPU with AVX512-BF16, bitsandbytes repacks each weight at
    its first eval-mode call and from then on multiplies through a fused kernel that casts the
    activations to bfloat16, whatever the compute dtype (measured: the runtime share shows it)."""
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in linears.values()):
        return "dequantise, then torch matmul in the compute dtype"
    ops = sys.modules.get("bitsandbytes.backends.cpu.ops")
    hub = getattr(ops, "gemm_4bit_forward_kernel", None) is not None
    return ("fused AVX512-BF16 4-bit GEMM on weights repacked at the first call, activations cast to bfloat16 "
            + ("(kernels-community/quantization-bitsandbytes from the Hugging Face Hub, imported before the harness)"
               if hub else "(the wheel's own library; the Hub kernel was not fetched)"))


def quantised_linears(model) -> dict[str, Any]:
    bnb = import_bitsandbytes()
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def as_quantised(module) -> tuple:
    """What a bitsandbytes Linear's weight holds as it was quantised, copied before its first call:
    on a CPU with AVX512-BF16 the first eval call repacks a 4-bit weight and rounds its absmax to
    bfloat16 (the kernel's doing, so the runtime's share), and bitsandbytes 0.50.2's own inverse of
    that repacking does not give the weights back for a 4-bit state without double quantisation
    (measured: save_pretrained after one forward writes weights whose logits move by 5.9)."""
    w = module.weight
    state = getattr(w, "quant_state", None)
    if state is not None:
        return w.data.clone(), copy.deepcopy(state)
    return w.CB if getattr(w, "CB", None) is not None else module.state.CB, \
        w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB


def dequantised_weight(held: tuple) -> torch.Tensor:
    """The float weight of ``as_quantised``'s copy."""
    bnb = import_bitsandbytes()
    data, state = held
    if isinstance(state, torch.Tensor):                  # int8: codes and one scale per row
        return bnb.functional.int8_vectorwise_dequant(data, state).float()
    return bnb.functional.dequantize_4bit(data, state).float()


class BitsandbytesLM(TransformersLM):
    name = KIND
    exact = False       # quantised weights: a budget judges it, with the error split

    def __init__(self, source: Source, dtype: str, device: str, quant: str, double: bool, compute: str | None,
                 **common):
        import_bitsandbytes()            # before transformers' quantiser imports it, Hub fetch blocked
        from transformers import BitsAndBytesConfig

        from harness.core.subjects import DTYPES
        self.quant, self.double, self.args = quant, double, source.ckpt.args
        self.compute = compute or dtype
        if quant == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                        bnb_4bit_use_double_quant=double,
                                        bnb_4bit_compute_dtype=DTYPES[self.compute])
        super().__init__(source, dtype, device, quantization_config=config, **common)
        linears = quantised_linears(self.model)
        floats = [n for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in linears]
        self.census = {"quantised": len(linears), "kept_float": sorted(floats), "fell_back": [],
                       "quantised_types": sorted({type(m).__name__ for m in linears.values()})}
        if self.fault is not None and hasattr(self.fault, "edit_built"):
            self.fault.edit_built(self.model)
        self.held = {name: as_quantised(m) for name, m in linears.items()}

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "quant": self.quant, "attn": self.attn}
        if self.quant != "int8":
            out["compute"] = self.compute
            if self.double:
                out["double"] = 1
        if self.tp != 1:
            out["tp"] = self.tp
        if self.cache != "dynamic":
            out["cache"] = self.cache
        return out

    def provenance(self) -> dict[str, Any]:
        if self.quant == "int8":
            how = {"weights": "int8, one absmax scale per output row (LLM.int8())",
                   "activations": "cast to float16, int8 per token; columns with an outlier above 6.0 "
                                  "anywhere in the batch stay float16 (llm_int8_threshold)"}
        else:
            how = {"weights": f"{self.quant}, blocks of 64 with one absmax each"
                              + (", the absmaxes quantised again (double quantisation)" if self.double else ""),
                   "compute_dtype": self.compute}
            if str(self.device).startswith("cpu"):
                how["cpu_kernel"] = cpu_kernel(quantised_linears(self.model))
        return {**super().provenance(), **package_versions("bitsandbytes"),
                "quantisation": {"config": "BitsAndBytesConfig", **how, **self.census}}

    def forward(self, ids, mask=None, positions=None):
        with quiet_int8_cast():
            return super().forward(ids, mask, positions)

    def decode(self, ids, prefill):
        with quiet_int8_cast():
            return super().decode(ids, prefill)

    def dequantised(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, p in self.model.named_parameters():
            owner = name.rsplit(".", 1)[0]
            state[name] = dequantised_weight(self.held[owner]) if owner in self.held and name.endswith(".weight") else p
        return meta_state(state, self.args)


@contextmanager
def quiet_int8_cast() -> Iterator[None]:
    """LLM.int8()'s per-call "inputs will be cast to float16" log line (recorded once in provenance)."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@register(KIND, axes=("attn", "tp", "cache"), offers=("hooks",))
def bitsandbytes_subject(source: Source, dtype: str, device: str, options: dict) -> BitsandbytesLM:
    o = Options(KIND, options)
    quant = o.choice("quant", QUANTS, "nf4")
    double = o.flag("double")
    compute = o.choice("compute", COMPUTE, "") or None
    common = common_options(o, KIND)
    o.done()
    if quant == "int8" and (double or compute):
        raise InputError(f"--subject {o.label}: double= and compute= are 4-bit options (quant=nf4 or fp4)")
    require(o.label, "bitsandbytes", "bitsandbytes", "bitsandbytes")
    return BitsandbytesLM(source, dtype, device, quant, double, compute, **common)

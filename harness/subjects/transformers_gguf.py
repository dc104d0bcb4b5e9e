"""transformers loading a GGUF file (``from_pretrained(folder, gguf_file=...)``), the route a user
takes to run a llama.cpp model in transformers. The GGUF is the one the llama.cpp subject's converter
writes (llama.cpp's own ``convert_hf_to_gguf.py`` on the harness's HF folder, harness/subjects/gguf.py),
cached by the weights' fingerprint; transformers dequantises every tensor to the working dtype and
undoes llama.cpp's q/k layout on load.

    --subject transformers:gguf=F32        the converter's F32 file: exact if both conversions are
    --subject transformers:gguf=Q8_0       a quantised file (made by llama-cpp-python's quantize call:
                                           needs that package); lossy, judged by its budget, with the split

A converter or loader that loses or reorders anything shows against the oracle: the F32 file holds
the checkpoint bit for bit (tests/test_subject_llamacpp.py), so the F32 subject must pass the exact
rule.
"""
from __future__ import annotations

from typing import Any

from harness.core.errors import InputError
from harness.core.subjects import DTYPES, load_transformers
from harness.subjects import NotInstalledError, Source
from harness.subjects.common import package_versions
from harness.subjects.transformers import TransformersLM


class GgufLM(TransformersLM):
    """LlamaForCausalLM.from_pretrained(folder, gguf_file=FILE): a GGUF read back by transformers."""

    def __init__(self, source: Source, dtype: str, device: str, quant: str, attn: str = "eager", tp: int = 1,
                 fault=None, device_map=None, offload_folder=None):
        if dtype not in DTYPES:
            raise InputError(f"--subject transformers:gguf={quant}: dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise InputError(f"--subject transformers:gguf={quant}: transformers refuses to offload a model read from "
                             "a GGUF file to disk; give place a --device-map (or --max-memory) that keeps it off disk")
        from harness.subjects import llamacpp
        self.dtype, self.device, self.attn, self.tp = dtype, device, attn, tp
        self.fault, self.cache, self.inference, self.compiled = fault, "dynamic", True, None
        self.source, self.quant = source, quant
        self.exact = quant == "F32"
        llama_cpp = None
        if quant != "F32":
            try:
                import llama_cpp
            except ImportError:
                raise NotInstalledError(f"--subject transformers:gguf={quant}: a quantised GGUF is made by "
                                        f"llama-cpp-python's quantize call, which is not installed "
                                        f"({llamacpp.INSTALL})") from None
        f32 = llamacpp.ensure_f32(source, llamacpp.gguf_folder(source))
        if llama_cpp is None:
            self.path, self.file = f32, llamacpp._read_record(f32)
        else:
            self.path, self.file = llamacpp.ensure_quant(llama_cpp, f32, quant, 1)
        # loaded as every transformers model of the harness is (load_transformers), so that a planted
        # model fault edits the config read from the GGUF and the model built from it the same way
        self.model = load_transformers("LlamaForCausalLM", self.path.parent, dtype, device, attn, fault,
                                       device_map=device_map, offload_folder=offload_folder,
                                       gguf_file=self.path.name, pretraining_tp=tp)

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "gguf": self.quant, "attn": self.attn, "tp": self.tp}

    def provenance(self) -> dict[str, Any]:
        return {**package_versions("torch", "transformers", "gguf"),
                "weights": f"{self.path.name}, loaded with from_pretrained(gguf_file=...) (dequantised by transformers)",
                "gguf": self.file, "attn_implementation": self.attn, "pretraining_tp": self.tp,
                "kv_cache": f"dynamic ({self.dtype})", **({"plant": self.fault.name} if self.fault else {})}

    def dequantised(self):
        """The GGUF's weights as transformers holds them (dequantised), in Meta's layout: the split."""
        if self.exact:
            return None
        from harness.subjects.common import meta_state
        return meta_state(dict(self.model.state_dict()), self.source.ckpt.args)


def load(source: Source, dtype: str, device: str, quant: str, attn: str, tp: int = 1, fault=None,
         device_map=None, offload_folder=None) -> GgufLM:
    known = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0")
    if quant not in known:
        raise InputError(f"--subject transformers:gguf={quant!r} (choose from {', '.join(known)})")
    if not _has_gguf():
        raise NotInstalledError("--subject transformers:gguf=: transformers reads GGUF files with the gguf package "
                                "(pip install gguf)")
    return GgufLM(source, dtype, device, quant, attn, tp, fault, device_map, offload_folder)


def _has_gguf() -> bool:
    from harness.subjects.common import has_module
    return has_module("gguf")


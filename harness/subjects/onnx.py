"""ONNX Runtime running the graph ``torch.onnx.export(dynamo=True)`` makes of transformers'
LlamaForCausalLM: what a user deploys when they take the model they load with transformers to
ONNX (the reference model is no one's deployment).

    --subject onnxruntime                 float32, eager attention in the exported graph
    --subject onnxruntime:attn=sdpa

The graph takes input_ids, attention_mask and position_ids with dynamic batch and sequence, and
returns every position's logits; it is exported without a KV cache (onnxruntime-genai is the
cached ONNX runtime). The export is cached under the harness cache, keyed by the weights'
fingerprint and the versions of everything that writes it (torch, transformers, onnx,
onnxscript, onnx-ir); ONNX Runtime runs it with its default graph optimisations on the CPU
execution provider. Float32 only: ONNX Runtime's CPU provider lacks bfloat16 kernels and float16
ones for much of this graph.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from harness.subjects import Source, register
from harness.subjects.common import Options, built, cache_key, package_versions, require, write_json

KIND = "onnxruntime"
EXPORTERS = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")
DTYPES = ("float32",)


class _Logits(torch.nn.Module):
    """What the graph computes: every position's logits from ids, mask and positions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits


def export(source: Source, dtype: str, attn: str) -> Path:
    """The cached ONNX export of transformers' model (made on first use); returns its folder."""
    tool = {"exporter": "torch.onnx.export(dynamo=True)", **package_versions(*EXPORTERS), "dtype": dtype,
            "attn": attn}
    folder = source.cache / KIND / cache_key(source, tool)
    with built(folder) as tmp:
        if tmp is not None:
            from harness.core.subjects import load_transformers, padded_positions
            model = load_transformers("LlamaForCausalLM", source.hf_path(), dtype, "cpu", attn)
            ids = torch.randint(0, source.ckpt.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                    "position_ids": {0: batch, 1: seq}}
            started = time.perf_counter()
            program = torch.onnx.export(_Logits(model).eval(), (ids, mask, padded_positions(mask)), dynamo=True,
                                        input_names=list(dims), output_names=["logits"], dynamic_shapes=dims,
                                        verbose=False)
            program.save(str(tmp / "model.onnx"))
            write_json(tmp / "build.json", {**tool, "seconds": round(time.perf_counter() - started, 1),
                                            "bytes": sum(p.stat().st_size for p in tmp.iterdir())})
    return folder


class OnnxRuntimeLM:
    name = KIND
    exact = True        # float32 arithmetic on the checkpoint's weights: the logits rule judges it

    def __init__(self, source: Source, dtype: str, device: str, attn: str, fault=None):
        self.dtype, self.device, self.attn, self.fault = dtype, device, attn, fault
        self.session = None
        if dtype not in DTYPES:
            return
        import onnx
        import onnxruntime as ort
        self.folder = export(source, dtype, attn)
        self.build = json.loads((self.folder / "build.json").read_text(encoding="utf-8"))
        graph: Any = str(self.folder / "model.onnx")
        if fault is not None:              # planted in a copy of the graph, never in the cache
            proto = onnx.load(graph)
            fault.edit_built(proto)
            graph = proto.SerializeToString()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "attn": self.attn}

    def provenance(self) -> dict[str, Any]:
        out = {**package_versions("onnxruntime"), "export": getattr(self, "build", None),
               "execution_provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL (default)",
               "weights": "transformers' LlamaForCausalLM from the harness's HF folder, exported in float32"}
        if self.fault is not None:
            out["plant"] = self.fault.name
        return out

    def cannot(self) -> dict[str, str]:
        out = {"decode": "the dynamo export is the full forward without a KV cache (onnxruntime-genai is the cached "
                         "ONNX runtime)",
               "hooks": "an ONNX Runtime session exposes the graph's outputs only, not per-layer values",
               "dtype:float64": "exported in float32 only"}
        if self.dtype not in DTYPES:
            out[f"dtype:{self.dtype}"] = ("ONNX Runtime's CPU provider lacks bfloat16 kernels and float16 ones for "
                                          "much of the graph; exported in float32 only")
        return out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.session is None:
            raise NotImplementedError(self.cannot()[f"dtype:{self.dtype}"])
        from harness.core.subjects import padded_positions
        mask = torch.ones_like(ids) if mask is None else mask
        positions = padded_positions(mask) if positions is None else positions
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        out = self.session.run(["logits"], {k: v.to("cpu", torch.int64).numpy() for k, v in feed.items()})[0]
        return torch.from_numpy(out).to(self.device)

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        raise NotImplementedError(self.cannot()["decode"])

    def dequantised(self) -> None:
        return None

    def close(self) -> None:
        self.session = None


@register(KIND, axes=("attn",))
def onnxruntime_subject(source: Source, dtype: str, device: str, options: dict) -> OnnxRuntimeLM:
    from harness.core.faults import get_subject_fault
    o = Options(KIND, options)
    attn = o.choice("attn", ("eager", "sdpa"), "eager")
    plant = o.text("plant")
    o.done()
    fault = get_subject_fault(plant, KIND, o.label) if plant else None
    for module, dist in (("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")):
        require(o.label, module, dist, "onnx")
    return OnnxRuntimeLM(source, dtype, device, attn, fault)

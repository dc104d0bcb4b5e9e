"""onnxruntime-genai: the ONNX model its own model builder writes from the HF folder, run by its
Generator with its own KV cache, as a user deploys Llama on ONNX Runtime.

    --subject onnxruntime-genai:precision=fp32
    --subject onnxruntime-genai:precision=int4                    MatMulNBits, blocks of 32, symmetric
    --subject onnxruntime-genai:precision=int4,accuracy_level=1   int4 weights, float32 activations

The builder (``python -m onnxruntime_genai.models.builder -e cpu``) fuses q/k/v into one
projection, uses GroupQueryAttention with a precomputed cos/sin cache, and at int4 quantises
every MatMul, the output head included, leaving the embedding in float. On the CPU its default
``accuracy_level`` is 4: activations are quantised to int8 inside each int4 MatMul, which is part
of the runtime's error, not the weights' (the error split shows how much). The build is cached
keyed by the weights' fingerprint and the versions of the builder and what it imports.

Logits of every position come from the prompt pass: each row is appended to a fresh Generator
and ``get_output("logits")`` read; ``decode`` appends one token per step after a prefill.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.errors import InputError
from harness.subjects import Source, register
from harness.subjects.common import Options, built, cache_key, meta_state, package_versions, require, write_json

KIND = "onnxruntime-genai"
PRECISIONS = ("fp32", "int4")
BUILDERS = ("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch")


def builder_input(source: Source, into: Path) -> Path:
    """The HF folder plus the tokenizer the builder insists on saving beside its model."""
    from harness.core.real_tokenizer import ensure_tokenizer_model
    tokenizer = source.tokenizer
    if tokenizer is None and source.ckpt.args.vocab_size == 32000:
        tokenizer = ensure_tokenizer_model()
    if tokenizer is None:
        raise InputError(f"--subject {KIND}: its model builder needs the model's tokenizer.model (none beside the "
                         f"weights, and the vocabulary of {source.ckpt.args.vocab_size} is not Llama 2's)")
    into.mkdir(parents=True)
    for p in source.hf_path().iterdir():
        os.symlink(p, into / p.name)
    shutil.copy(tokenizer, into / "tokenizer.model")
    write_json(into / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                "eos_token": "</s>", "unk_token": "<unk>"})
    return into


def build(source: Source, precision: str, accuracy: int | None) -> Path:
    extra = {} if accuracy is None else {"accuracy_level": str(accuracy)}
    tool = {"builder": "onnxruntime_genai.models.builder -e cpu", **package_versions(*BUILDERS),
            "precision": precision, "extra_options": extra}
    folder = source.cache / KIND / cache_key(source, tool)
    with built(folder) as tmp:
        if tmp is not None:
            with tempfile.TemporaryDirectory(prefix="llama-parity-genai-") as work:
                hf = builder_input(source, Path(work) / "hf")
                cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp / "model"),
                       "-p", precision, "-e", "cpu", "-c", str(Path(work) / "cache")]
                if extra:
                    cmd += ["--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
                started = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
                (tmp / "build.log").write_text(done.stdout + done.stderr, encoding="utf-8")
                if done.returncode != 0:
                    _log_failure(folder, done.stdout + done.stderr)
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"onnxruntime-genai's model builder failed ({tail[0][:200]}); "
                                       f"its log: {folder}.failed.log")
            size = sum(p.stat().st_size for p in (tmp / "model").iterdir())
            write_json(tmp / "build.json", {**tool, "seconds": round(time.perf_counter() - started, 1), "bytes": size})
    return folder


def _log_failure(folder: Path, log: str) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{folder}.failed.log").write_text(log, encoding="utf-8")


# --- MatMulNBits weights back to float (the error split) ----------------------------------------

def dequantise_nbits(packed: np.ndarray, scales: np.ndarray, n: int, k: int, block: int,
                     zero_points: np.ndarray | None = None) -> np.ndarray:
    """A MatMulNBits 4-bit weight as the (N, K) float matrix it stands for: two values a byte,
    low nibble first, (q - zero point) * scale per block of ``block`` along K; symmetric builds
    store no zero points (8, the middle of 0..15)."""
    blocks = packed.shape[1]
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block).astype(np.float32)
    if zero_points is None:
        zp = np.float32(8)
    else:
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks, None]
    w = (q - zp) * scales.reshape(n, blocks, 1).astype(np.float32)
    return w.reshape(n, blocks * block)[:, :k]


def hf_keys(initializer: str) -> str:
    """model.layers.0.attn.o_proj.MatMul.weight_Q4 -> model.layers.0.self_attn.o_proj.weight"""
    base = initializer.split(".MatMul.")[0]
    return base.replace(".attn.", ".self_attn.") + ".weight"


class GenaiLM:
    name = KIND

    @property
    def exact(self) -> bool:
        """fp32 graphs are judged by the logits rule; int4 by its budget, with the split."""
        return self.precision == "fp32"

    def __init__(self, source: Source, dtype: str, device: str, precision: str, accuracy: int | None, fault=None):
        self.dtype, self.device, self.precision, self.accuracy, self.fault = dtype, device, precision, accuracy, fault
        self.args, self.weights, self.model, self._tmp = source.ckpt.args, source.ckpt.state, None, None
        if dtype != "float32":
            return
        import onnxruntime_genai as og
        folder = build(source, precision, accuracy)
        self.build = json.loads((folder / "build.json").read_text(encoding="utf-8"))
        self.path = folder / "model"
        if fault is not None:             # planted in a copy, never in the cache
            self._tmp = tempfile.TemporaryDirectory(prefix="llama-parity-genai-plant-")
            self.path = Path(self._tmp.name) / "model"
            shutil.copytree(folder / "model", self.path)
            fault.edit_built(self.path)
        self.model = og.Model(str(self.path))
        self.census = self._census()

    def _graph(self):
        import onnx
        return onnx.load(str(self.path / "model.onnx"))

    def _census(self) -> dict[str, Any]:
        import onnx
        graph = onnx.load(str(self.path / "model.onnx"), load_external_data=False).graph
        quantised = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
        float_mm = [n.name for n in graph.node if n.op_type == "MatMul"]
        levels = sorted({onnx.helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits"
                         for a in n.attribute if a.name == "accuracy_level"})
        return {"matmul_nbits": len(quantised), "float_matmul": len(float_mm),
                "lm_head_quantised": any("lm_head" in q for q in quantised), "accuracy_level": levels or None,
                "embedding": "float32 Gather"}

    # -- the protocol ------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "precision": self.precision}
        if self.accuracy is not None:
            out["accuracy_level"] = self.accuracy
        return out

    def provenance(self) -> dict[str, Any]:
        out = {**package_versions("onnxruntime-genai", "onnxruntime"), "build": getattr(self, "build", None),
               "graph": getattr(self, "census", None), "kv_cache": "float32, the Generator's own (past_present_share_buffer)"}
        if self.fault is not None:
            out["plant"] = self.fault.name
        return out

    def cannot(self) -> dict[str, str]:
        out = {"padding": "the Generator pads batches itself; the harness feeds each row alone, so a mask given "
                          "with left-padded rows is not the subject's own",
               "hooks": "the runtime exposes the graph's outputs only, not per-layer values",
               "dtype:float64": "the builder writes fp32, fp16, bf16, int8 or int4 graphs"}
        if self.dtype != "float32":
            out[f"dtype:{self.dtype}"] = "run as built by precision= (fp32 or int4 weights, float32 activations)"
        return out

    def _generator(self, length: int):
        import onnxruntime_genai as og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length)
        return og.Generator(self.model, params)

    def _steps(self, row: torch.Tensor, prefill: int) -> torch.Tensor:
        gen = self._generator(row.numel())
        ids = row.to("cpu", torch.int32).numpy()
        gen.append_tokens(ids[:prefill])
        steps = [np.array(gen.get_output("logits"))]
        for t in ids[prefill:]:
            gen.append_tokens(np.array([t], dtype=np.int32))
            steps.append(np.array(gen.get_output("logits")))
        return torch.from_numpy(np.concatenate(steps, axis=1))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.model is None:
            raise NotImplementedError(self.cannot()[f"dtype:{self.dtype}"])
        if mask is not None or positions is not None:
            raise NotImplementedError(self.cannot()["padding"])
        return torch.cat([self._steps(row, row.numel()) for row in ids]).to(self.device)

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        if self.model is None:
            raise NotImplementedError(self.cannot()[f"dtype:{self.dtype}"])
        return torch.cat([self._steps(row, prefill) for row in ids]).to(self.device)

    def dequantised(self) -> dict[str, torch.Tensor] | None:
        """int4: the checkpoint with every MatMulNBits weight replaced by what it dequantises to."""
        if self.precision == "fp32" or self.model is None:
            return None
        from onnx import helper, numpy_helper
        graph = self._graph().graph
        init = {i.name: i for i in graph.initializer}
        a = self.args
        hd = a.dim // a.n_heads
        hf: dict[str, torch.Tensor] = {}
        for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
            attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            zp = numpy_helper.to_array(init[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
            w = torch.from_numpy(dequantise_nbits(numpy_helper.to_array(init[node.input[1]]),
                                                  numpy_helper.to_array(init[node.input[2]]), attrs["N"], attrs["K"],
                                                  attrs["block_size"], zp))
            key = hf_keys(node.input[1])
            if ".qkv_proj." in key:
                q, k, v = w.split([a.n_heads * hd, a.kv_heads * hd, a.kv_heads * hd])
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    hf[key.replace("qkv_proj", name)] = part
            else:
                hf[key] = w
        state = {k: v.to(torch.float32) for k, v in self.weights.items()}
        state.update(meta_state(hf, a))
        return state

    def close(self) -> None:
        self.model = None
        if self._tmp is not None:
            self._tmp.cleanup()


@register(KIND)
def genai_subject(source: Source, dtype: str, device: str, options: dict) -> GenaiLM:
    from harness.core.faults import get_subject_fault
    o = Options(KIND, options)
    precision = o.choice("precision", PRECISIONS, "fp32")
    accuracy = o.text("accuracy_level")
    plant = o.text("plant")
    o.done()
    if accuracy is not None:
        if precision != "int4" or accuracy not in ("1", "2", "3", "4"):
            raise InputError(f"--subject {o.label}: accuracy_level= is 1..4 and only for precision=int4")
        accuracy = int(accuracy)
    fault = get_subject_fault(plant, KIND, o.label) if plant else None
    require(o.label, "onnxruntime_genai", "onnxruntime-genai", "onnx")
    return GenaiLM(source, dtype, device, precision, accuracy, fault)

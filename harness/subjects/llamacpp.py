"""llama.cpp through llama-cpp-python, on a GGUF that llama.cpp's own converter wrote.

    --subject llama.cpp[:quant=F32|F16|Q8_0|Q4_0|Q4_K_M|Q6_K|...,kv=f32|f16|q8_0,threads=N,flash_attn=0|1]

What it runs: the harness's HF folder (plus a ``tokenizer.model``) through llama.cpp's
``convert_hf_to_gguf.py`` to F32, then ``llama_model_quantize`` to ``quant`` (harness.subjects.gguf),
loaded with ``logits_all=True`` so every position's full next-token logits come back. Token ids are
fed as given (no tokenisation; BOS only where the ids have it), one row per context with the KV
cache cleared between rows. ``decode`` goes through llama.cpp's own cache: the prefill in one
eval, then one token per eval.

``quant`` picks the weights' type; activations are float32 on CPU whatever it is, and ``kv`` picks
the KV cache's type (llama.cpp's default is f16, which makes even F32 weights lossy). F32 weights
with an f32 cache is llama.cpp's exact configuration and is judged like transformers (against the
reference's own float32 error); everything else is lossy and judged against the per-type budgets
of suites/subjects_tolerance.toml, with the error split into weights and runtime
(``dequantised()``: the file's own weights, for the oracle).

Not installed: the subject is n/a with the install command (``INSTALL``) as its reason.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.core import real_tokenizer
from harness.core.errors import InputError
from harness.core.store import atomic_write_text
from harness.subjects import CAPABILITIES, Source, register
from harness.subjects import gguf as gguf_files

KIND = "llama.cpp"
# Portable x86-64 flags (AVX2 level, what most CPUs of the last decade run): a native build
# (-march=native) dies with SIGILL on quantised types on a CPU that advertises AMX but does not
# allow it, and its numbers are not the ones other machines get. LLAVA_BUILD=OFF skips the
# multimodal library the subject never loads.
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                       "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
                       "-DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF")
INSTALL = f"CMAKE_ARGS=\"{PORTABLE_CMAKE_ARGS}\" pip install -e '.[llamacpp]'  (or: tox -e llamacpp)"
KV_TYPES = {"f32": "GGML_TYPE_F32", "f16": "GGML_TYPE_F16", "bf16": "GGML_TYPE_BF16",
            "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
OPTIONS = ("quant", "kv", "threads", "flash_attn", "plant")
DEFAULTS = {"quant": "F32", "kv": "f16"}        # kv: llama.cpp's own default cache type


def missing() -> str:
    """Why the subject cannot run here ('' when it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {INSTALL}"
    return ""


def parse_options(options: dict[str, str], arg: str = "--subject llama.cpp") -> dict[str, Any]:
    """Validated options (exit 2 naming the key); checked before anything is built or imported."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"{arg}: unknown option(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    quant = options.get("quant", DEFAULTS["quant"]).upper()
    if quant not in gguf_files.QUANTS:
        raise InputError(f"{arg}: quant={options['quant']!r} (known: {', '.join(gguf_files.QUANTS)})")
    kv = options.get("kv", DEFAULTS["kv"]).lower()
    if kv not in KV_TYPES:
        raise InputError(f"{arg}: kv={options['kv']!r} (known: {', '.join(KV_TYPES)})")
    threads = None
    if "threads" in options:
        from harness.core.inputs import integer
        threads = integer(f"{arg}: threads", options["threads"], 1, 1024)
    fa = options.get("flash_attn")
    if fa not in (None, "0", "1"):
        raise InputError(f"{arg}: flash_attn={fa!r} (0 or 1)")
    quantised_v = kv not in ("f32", "f16", "bf16")
    if quantised_v and fa == "0":
        raise InputError(f"{arg}: kv={kv} needs flash_attn=1 (llama.cpp quantises the V cache only with flash attention)")
    return {"quant": quant, "kv": kv, "threads": threads,
            "flash_attn": quantised_v if fa is None else fa == "1", "plant": options.get("plant")}


@register(KIND)
def make(source: Source, dtype: str, device: str, options: dict[str, str]):
    opts = parse_options(options)
    fault = None
    if opts["plant"]:
        from harness.core.faults import get_fault
        fault = get_fault(opts["plant"], "logits", kind=KIND)
    why = missing()
    if why:
        return NotInstalled(opts, why)
    return LlamaCpp(source, dtype, device, opts, fault)


def _cannot(dtype: str) -> dict[str, str]:
    lowp = ("llama.cpp on CPU computes activations in float32 whatever the weights are; lower precision "
            "enters through quant= (weights) and kv= (the KV cache)")
    out = {
        "padding": ("llama-cpp-python's eval takes no attention mask: rows are run one per context with the KV "
                    "cache cleared between them, so a left-padded batch would attend its pads"),
        "hooks": "the forward runs inside libllama (C/C++): no per-layer or per-op captures (localisation, streaming)",
        "planting": ("the harness's transformers faults edit a torch model; llama.cpp takes its own "
                     "(harness.core.faults kinds=('llama.cpp',): plant=NAME)"),
        "dtype:float64": "ggml's CPU backend has no float64 forward; the float64 oracle is the reference's",
        "dtype:bfloat16": lowp,
        "dtype:float16": lowp,
    }
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        out[f"dtype:{dtype}"] = lowp
    return out


class NotInstalled:
    """llama.cpp asked for where llama-cpp-python is missing: every cell n/a with the install command."""
    name = KIND

    def __init__(self, opts: dict, why: str):
        self.opts, self.why = opts, why

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.opts.items() if k != "plant" and v is not None}

    def provenance(self) -> dict[str, Any]:
        return {"installed": False, "install": INSTALL}

    def cannot(self) -> dict[str, str]:
        return {"subject": self.why, **{cap: self.why for cap in CAPABILITIES}}

    def forward(self, ids, mask=None, positions=None):
        raise RuntimeError(self.why)

    def decode(self, ids, prefill):
        raise RuntimeError(self.why)

    def close(self) -> None:
        pass


class LlamaCpp:
    name = KIND

    def __init__(self, source: Source, dtype: str, device: str, opts: dict, fault=None):
        import llama_cpp
        self.llama_cpp, self.source, self.dtype, self.opts, self.fault = llama_cpp, source, dtype, opts, fault
        self.gpu = device != "cpu"
        if self.gpu and not llama_cpp.llama_supports_gpu_offload():
            raise InputError(f"--device {device}: this llama-cpp-python was built for the CPU only (rebuild it "
                             "with CMAKE_ARGS=\"-DGGML_CUDA=on\" to run llama.cpp on a GPU)")
        self.device = device
        self.threads = opts["threads"] or max(os.cpu_count() // 2, 1)   # llama-cpp-python's own default
        self.exact = opts["quant"] == "F32" and opts["kv"] == "f32"
        self._tmp = tempfile.TemporaryDirectory(prefix="llama-parity-planted-") if fault is not None else None
        self.path, self.file = self._gguf()
        self._llm, self._n_ctx = None, 0
        self.context = {"type_k": opts["kv"], "type_v": opts["kv"], "flash_attn": opts["flash_attn"]}
        if fault is not None:
            fault.edit_context(self.context)     # the settings still say what was asked: that is the bug

    # -- the file ---------------------------------------------------------------------------------
    def _gguf(self) -> tuple[Path, dict]:
        """(path, provenance) of the GGUF for this quant, converted and quantised once per weights."""
        folder = Path(self._tmp.name) if self._tmp is not None else gguf_folder(self.source)   # planted: never cached
        f32 = ensure_f32(self.source, folder, getattr(self.fault, "edit_hf_state", None))
        if self.opts["quant"] == "F32":
            return f32, _read_record(f32)
        return ensure_quant(self.llama_cpp, f32, self.opts["quant"], self.threads)

    def dequantised(self):
        """The GGUF's own weights, dequantised, in Meta's layout and names (for the oracle: the split)."""
        from reference_model.checkpoint import Checkpoint
        args, state = gguf_files.read_meta_state(self.path, self.source.ckpt.args)
        return Checkpoint(args, state, "gguf", self.path)

    # -- the runtime --------------------------------------------------------------------------------
    def _model(self, n: int):
        """The llama_cpp.Llama, (re)made when a row needs a longer context than it has."""
        if self._llm is None or n > self._n_ctx:
            self.close_model()
            lc = self.llama_cpp
            self._n_ctx = max(256, -(-n // 256) * 256)
            self._llm = lc.Llama(
                str(self.path), n_ctx=self._n_ctx, n_batch=min(512, self._n_ctx), n_ubatch=min(512, self._n_ctx),
                n_threads=self.threads, n_threads_batch=self.threads, logits_all=True, verbose=False,
                n_gpu_layers=-1 if self.gpu else 0, flash_attn=self.context["flash_attn"],
                type_k=getattr(lc, KV_TYPES[self.context["type_k"]]),
                type_v=getattr(lc, KV_TYPES[self.context["type_v"]]))
            if self._llm.n_vocab() != self.source.ckpt.args.vocab_size:
                raise RuntimeError(f"{self.path}: llama.cpp reads {self._llm.n_vocab()} vocabulary entries, "
                                   f"the checkpoint has {self.source.ckpt.args.vocab_size}")
        return self._llm

    def _rows(self, ids: torch.Tensor) -> list[list[int]]:
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, seq), got {tuple(ids.shape)}")
        vocab = self.source.ckpt.args.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids outside [0, {vocab})")
        return ids.tolist()

    def _out(self, rows: list) -> torch.Tensor:
        import numpy as np
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if (mask is not None and not bool(mask.bool().all())) or positions is not None:
            raise RuntimeError(f"llama.cpp cannot run a padded batch: {self.cannot()['padding']}")
        out = []
        for row in self._rows(ids):
            llm = self._model(len(row))
            llm.reset()                           # n_tokens = 0: eval drops every cached position first
            llm.eval(row)
            out.append(llm.scores[:len(row)].copy())
        return self._out(out)

    def decode(self, ids: torch.Tensor, prefill: int) -> torch.Tensor:
        out = []
        for row in self._rows(ids):
            if not 1 <= prefill <= len(row):
                raise ValueError(f"prefill {prefill} outside 1..{len(row)}")
            llm = self._model(len(row))
            llm.reset()
            llm.eval(row[:prefill])
            for token in row[prefill:]:
                llm.eval([token])                 # one token per eval, through llama.cpp's KV cache
            out.append(llm.scores[:len(row)].copy())
        return self._out(out)

    # -- what it says about itself ---------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        s = {"quant": self.opts["quant"], "kv": self.opts["kv"], "threads": self.threads,
             "flash_attn": int(self.opts["flash_attn"]), "dtype": "float32"}
        if self.fault is not None:
            s["plant"] = self.fault.name
        return s

    def provenance(self) -> dict[str, Any]:
        lc = self.llama_cpp
        types = gguf_files.tensor_types(self.path)
        import gguf
        return {
            "llama_cpp_python": lc.__version__,
            "system_info": lc.llama_print_system_info().decode("utf-8", "replace").strip(),
            "build_flags_documented": PORTABLE_CMAKE_ARGS,
            "converter": gguf_files.CONVERTER_VERSION + " vendor/llama.cpp/convert_hf_to_gguf.py --outtype f32",
            "gguf_package": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "gguf_file": self.path.name,
            "gguf_sha256": _sha256(self.path),
            "weights_fingerprint": self.source.fingerprint,
            "quant": self.opts["quant"],
            "tensor_types": gguf_files.type_counts(types),
            "fallbacks": len(self.file.get("fallbacks", [])),
            "fallback_tensors": self.file.get("fallbacks", []),
            "kv_cache": {"type_k": self.context["type_k"], "type_v": self.context["type_v"]},
            "flash_attn": self.context["flash_attn"],
            "n_ctx": self._n_ctx or None, "n_batch": min(512, self._n_ctx) if self._n_ctx else None,
            "threads": self.threads,
            **({"planted": self.fault.name} if self.fault is not None else {}),
        }

    def cannot(self) -> dict[str, str]:
        return _cannot(self.dtype)

    def close_model(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def close(self) -> None:
        self.close_model()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def gguf_folder(source: Source) -> Path:
    """Where the GGUFs of these weights are cached: keyed by the weights and the converter's release."""
    return source.cache / "llama.cpp" / "gguf" / f"{source.fingerprint[:24]}-conv{real_tokenizer.VERSION}"


def ensure_f32(source: Source, folder: Path, edit_hf_state=None) -> Path:
    """``folder``/F32.gguf, written by llama.cpp's converter unless it is there with its record."""
    f32 = folder / "F32.gguf"
    with real_tokenizer._locked(folder):
        if not (f32.is_file() and f32.with_suffix(".json").is_file()):
            tokenizer = source.tokenizer or real_tokenizer.ensure_tokenizer_model()
            said = gguf_files.convert(source.hf_path(), tokenizer, f32, gguf_files.converter_dir(source.cache),
                                      edit_hf_state)
            said["tokenizer"] = {"file": Path(tokenizer).name, "sha256": _sha256(Path(tokenizer)),
                                 "note": "only the GGUF's vocabulary: ids are fed to llama.cpp as given"}
            _write_record(f32, said)
    return f32


def ensure_quant(llama_cpp, f32: Path, quant: str, threads: int) -> tuple[Path, dict]:
    """The F32 file quantised to ``quant`` by this llama-cpp-python (its release is in the name)."""
    target = f32.with_name(f"{quant}-llama_cpp{llama_cpp.__version__}.gguf")
    with real_tokenizer._locked(f32.parent):
        if not (target.is_file() and target.with_suffix(".json").is_file()):
            said = gguf_files.quantize(llama_cpp, f32, target, quant, threads)
            said["from"] = f32.name
            _write_record(target, said)
    return target, _read_record(target)


def _read_record(gguf_path: Path) -> dict:
    return json.loads(gguf_path.with_suffix(".json").read_text(encoding="utf-8"))


def _sha256(path: Path) -> str:
    from harness.core.checkpoints import file_sha256
    return file_sha256(path)


def _write_record(gguf_path: Path, said: dict) -> None:
    types = gguf_files.tensor_types(gguf_path)
    said = {**said, "sha256": _sha256(gguf_path), "tensor_types": gguf_files.type_counts(types)}
    atomic_write_text(gguf_path.with_suffix(".json"), json.dumps(said, indent=1) + "\n")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


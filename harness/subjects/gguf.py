"""GGUF files for the llama.cpp subject, made the way a llama.cpp user makes them, and read back.

- **Converter.** llama.cpp's own ``convert_hf_to_gguf.py``, from the ``llama-cpp-python`` sdist the
  project already pins for its tokenizer fixture (``harness.core.real_tokenizer``), unpacked once
  into the cache (only the converter, its ``conversion/`` package and the vendored ``gguf-py``) and
  run as a subprocess on the harness's HF folder plus a ``tokenizer.model``. It writes F32; the
  converter undoes HF's q/k permute itself (``LlamaModel.undo_permute``), as it does for users.
- **Quantisation.** The library's own call, ``llama_cpp.llama_model_quantize``, from that F32 file.
  What llama.cpp says while quantising is kept: every tensor whose shape the requested type does
  not fit and the type it fell back to (K-quants need rows that are multiples of 256).
- **Reading back.** ``read_meta_state`` dequantises every tensor with the ``gguf`` package and maps
  llama.cpp's names to Meta's, for the oracle on the file's own weights (the error split).

Files are cached under ``Source.cache / "llama.cpp"``, keyed by the weights' fingerprint, the
converter's sdist and (for quantised files) the llama-cpp-python that quantised them.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

import torch

from harness.core import real_tokenizer
from harness.core.errors import InputError
from harness.core.store import atomic_write_text
from reference_model.model import ModelArgs

SDIST = real_tokenizer.SDIST_NAME
SDIST_SHA256 = real_tokenizer.SDIST_SHA256
CONVERTER_VERSION = f"{real_tokenizer.PACKAGE}=={real_tokenizer.VERSION}"
_VENDOR = "vendor/llama.cpp/"
# What the converter needs of the sdist (never the whole archive, never its C++ sources).
_CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

# Every llama.cpp tensor name of a Llama 2 GGUF and its Meta name ({} = the block index).
GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def meta_name(gguf_name: str) -> str:
    m = _BLOCK.match(gguf_name)
    key = f"blk.{{}}.{m.group(2)}" if m else gguf_name
    if key not in GGUF_TO_META:
        raise RuntimeError(f"GGUF tensor {gguf_name!r} has no Meta Llama 2 name (not a Llama 2 GGUF?)")
    return GGUF_TO_META[key].format(m.group(1)) if m else GGUF_TO_META[key]


# --- the converter, unpacked once from the pinned sdist ------------------------------------------

def converter_dir(cache: Path) -> Path:
    """``<cache>/llama.cpp/converter-<version>/``: convert_hf_to_gguf.py, conversion/, gguf-py/."""
    root = cache / "llama.cpp"
    target = root / f"converter-{real_tokenizer.VERSION}-{SDIST_SHA256[:12]}"
    stamp = target / "PROVENANCE.json"
    if stamp.is_file():
        return target
    with real_tokenizer._locked(root):
        if stamp.is_file():
            return target
        with tempfile.TemporaryDirectory(prefix="sdist-", dir=root) as tmp:
            sdist = real_tokenizer._fetch_sdist(Path(tmp))
            digest = real_tokenizer._sha256(sdist.read_bytes())
            if digest != SDIST_SHA256:
                raise InputError(f"{sdist}: sha256 {digest} is not the pinned {SDIST_SHA256} of {SDIST}")
            out = Path(tmp) / "converter"
            _extract_converter(sdist, out)
            atomic_write_text(out / "PROVENANCE.json", json.dumps({
                "what": "llama.cpp's convert_hf_to_gguf.py with its conversion/ package and vendored gguf-py",
                "sdist": SDIST, "sdist_sha256": digest, "members": [_VENDOR + m for m in _CONVERTER_MEMBERS],
            }, indent=1) + "\n")
            if target.exists():            # an unfinished earlier unpack (no PROVENANCE.json)
                shutil.rmtree(target)
            os.replace(out, target)
    return target


def _extract_converter(sdist: Path, out: Path) -> None:
    found = set()
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for member in tar:
                _, _, rel = member.name.partition("/")          # "<name>-<version>/<path>"
                if not rel.startswith(_VENDOR):
                    continue
                inner = rel[len(_VENDOR):]
                top = next((m for m in _CONVERTER_MEMBERS if inner == m or (m.endswith("/") and inner.startswith(m))), None)
                if top is None or not (member.isfile() or member.isdir()):
                    continue
                found.add(top)
                member.name = inner
                members.append(member)
            tar.extractall(out, members=members, filter="data")   # "data": no links out, no devices
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"{sdist}: not a readable .tar.gz ({e})") from None
    missing = sorted(set(_CONVERTER_MEMBERS) - found)
    if missing:
        raise InputError(f"{sdist}: has no {', '.join(_VENDOR + m for m in missing)}")


# --- HF folder -> F32 GGUF -----------------------------------------------------------------------

def convert(hf_dir: Path, tokenizer: Path, out: Path, converter: Path,
            edit_state: Callable[[dict, dict], None] | None = None) -> dict:
    """Run llama.cpp's converter on ``hf_dir`` (+ ``tokenizer``) and write an F32 GGUF at ``out``.

    ``edit_state(hf_state, config)`` edits the HF tensors first (a planted converter bug); the
    edited folder is a temporary copy, never the cached one. Returns what the run said.
    """
    with tempfile.TemporaryDirectory(prefix="llama-parity-gguf-") as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()
        for f in hf_dir.iterdir():
            if f.is_file() and f.name != "tokenizer.model":
                os.symlink(f.resolve(), folder / f.name)
        os.symlink(Path(tokenizer).resolve(), folder / "tokenizer.model")
        if edit_state is not None:
            _edit_folder(folder, edit_state)
        written = Path(tmp) / "model.gguf"
        cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
               "--outfile", str(written)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("NO_LOCAL_GGUF", None)              # the converter's own gguf-py, not the installed one
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not written.is_file():
            raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed (exit {proc.returncode}) on {hf_dir}:\n"
                               f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(written), out.with_name(out.name + ".tmp"))
        os.replace(out.with_name(out.name + ".tmp"), out)
    return {"converter": CONVERTER_VERSION, "command": "convert_hf_to_gguf.py HF_DIR --outtype f32"}


def _edit_folder(folder: Path, edit_state: Callable[[dict, dict], None]) -> None:
    from safetensors.torch import load_file, save_file
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for f in sorted(folder.glob("*.safetensors")):
        state = load_file(str(f))
        edit_state(state, config)
        f.unlink()                                  # a symlink to the cached folder: replace, never write through
        save_file(state, str(f), metadata={"format": "pt"})


# --- F32 GGUF -> another type, by the library --------------------------------------------------

QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
          "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
_FALLBACK = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                       r".*?-> falling back to\s+(\S+)", re.S)


def ftype(llama_cpp, quant: str) -> int:
    name = "LLAMA_FTYPE_ALL_F32" if quant == "F32" else f"LLAMA_FTYPE_MOSTLY_{quant}"
    if quant not in QUANTS or not hasattr(llama_cpp, name):
        raise InputError(f"--subject llama.cpp: quant={quant!r} is not a type this llama-cpp-python quantises "
                         f"(known: {', '.join(QUANTS)})")
    return int(getattr(llama_cpp, name))


def quantize(llama_cpp, src: Path, out: Path, quant: str, threads: int) -> dict:
    """``llama_model_quantize(src -> out, ftype)``; returns the tensors that fell back, as llama.cpp said."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(llama_cpp, quant)
    params.nthread = threads
    tmp = out.with_name(out.name + ".tmp")
    with _captured_log(llama_cpp) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src.name} -> {quant}) returned {rc}:\n{''.join(log)[-3000:]}")
    os.replace(tmp, out)
    text = "".join(log)
    fallbacks = [{"tensor": m.group(1), "ncols": int(m.group(2)), "block": int(m.group(3)),
                  "wanted": m.group(4), "got": m.group(5)} for m in _FALLBACK.finditer(text)]
    return {"quantize": f"llama_model_quantize ftype {quant} ({params.ftype})", "fallbacks": fallbacks}


class _captured_log:
    """llama.cpp's log lines while a call runs (its own statements about fallbacks); the library's
    logger is put back afterwards."""

    def __init__(self, llama_cpp):
        self.llama_cpp, self.lines = llama_cpp, []

    def __enter__(self):
        @self.llama_cpp.llama_log_callback
        def keep(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))
        self._keep = keep                           # a live reference: ctypes must not free the callback
        self.llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
        return self.lines

    def __exit__(self, *exc):
        try:
            from llama_cpp import _logger
            self.llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except ImportError:
            self.llama_cpp.llama_log_set(ctypes.cast(None, self.llama_cpp.llama_log_callback), ctypes.c_void_p(0))


# --- reading a GGUF back ---------------------------------------------------------------------------

def _reader(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:        # the gguf package raises ValueError/struct.error/... on bad files
        raise RuntimeError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def tensor_types(path: Path) -> dict[str, str]:
    """tensor name -> ggml type name, as stored."""
    return {t.name: t.tensor_type.name for t in _reader(path).tensors}


def type_counts(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def metadata(path: Path) -> dict:
    """The Llama hyper-parameters the file declares (what llama.cpp will run)."""
    reader = _reader(path)

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    return {"architecture": field("general.architecture"), "dim": field("llama.embedding_length"),
            "n_layers": field("llama.block_count"), "n_heads": field("llama.attention.head_count"),
            "n_kv_heads": field("llama.attention.head_count_kv"), "ffn": field("llama.feed_forward_length"),
            "norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
            "rope_theta": field("llama.rope.freq_base", 10000.0), "rope_dim": field("llama.rope.dimension_count"),
            "n_vocab": len(field("tokenizer.ggml.tokens", []))}


def read_meta_state(path: Path, like: ModelArgs) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Every tensor of the GGUF dequantised to float32 under its Meta name, and the ModelArgs the
    file declares (``like`` gives what a GGUF does not hold: multiple_of, max_seq_len).

    q/k layout: the converter permuted HF's q/k back to Meta's interleaved-pair layout (its
    ``LlamaModel.permute``, the inverse of the HF permute), and llama.cpp's Llama RoPE rotates
    interleaved pairs; so a GGUF's q/k are in the layout reference_model expects and nothing is
    undone here. tests/test_subject_llamacpp.py proves it on the F32 file: every tensor equals the
    checkpoint's bit for bit.
    """
    import numpy as np
    from gguf.quants import dequantize
    reader = _reader(path)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))       # GGUF lists ne0 (columns) first
        values = dequantize(np.asarray(t.data), t.tensor_type)
        state[meta_name(t.name)] = torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(shape))
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]       # what llama.cpp does for a tied head
    meta = metadata(path)
    # GGUF keeps eps and the RoPE base as float32: where that is the source's number rounded, the
    # file means the source's number (llama.cpp computes with the float32 either way).
    for key, have in (("norm_eps", like.norm_eps), ("rope_theta", like.rope_theta)):
        if np.float32(meta[key]) == np.float32(have):
            meta[key] = have
    args = ModelArgs(dim=int(meta["dim"]), n_layers=int(meta["n_layers"]), n_heads=int(meta["n_heads"]),
                     n_kv_heads=int(meta["n_kv_heads"] or meta["n_heads"]), vocab_size=state["tok_embeddings.weight"].shape[0],
                     multiple_of=like.multiple_of, ffn_dim_multiplier=like.ffn_dim_multiplier,
                     norm_eps=float(meta["norm_eps"]), rope_theta=float(meta["rope_theta"]),
                     max_seq_len=like.max_seq_len)
    ffn = state["layers.0.feed_forward.w1.weight"].shape[0] if args.n_layers else args.ffn_hidden
    if args.ffn_hidden != ffn:
        raise RuntimeError(f"{path}: FFN width {ffn} is not what the source's params give ({args.ffn_hidden})")
    return args, state

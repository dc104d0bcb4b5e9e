"""GPTQ, the format most quantised Llama 2 checkpoints on the Hub are in, as a subject in its own venv.

    --subject gptq                         4-bit, groups of 128, symmetric, no act-order (TheBloke's
                                           "main" branch of Llama-2-7B-GPTQ)
    --subject gptq:bits=8,group=64,desc_act=1,calib=64,damp=0.01
    --subject gptq:plant=gptq-zeros-v2     a planted bug, in a copy of the quantised folder

What it runs (harness/subjects/workers/run_gptq.py, in the venv of suites/venvs/gptq.txt: GPT-QModel
7.7 requires torch >= 2.14.1 and the harness pins 2.13.0): GPT-QModel quantises the harness's HF folder
on calibration text the fidelity table never measures (the pydoc topics' paragraphs minus the held-out
ones, ``calib`` windows of 256 tokens), once per weights' fingerprint, venv and options, into
``Source.cache``; then transformers' ``from_pretrained`` loads that folder as a user loads a GPTQ
checkpoint from the Hub (optimum hands its linears to GPT-QModel's kernels; on a CPU, GPT-QModel
compiles its kernel once, into the cache too).

GPTQ is always lossy: judged against the budgets of suites/subjects_tolerance.toml, with the error
split. ``dequantised()`` reads the folder's ``qweight``/``qzeros``/``scales``/``g_idx`` with the
harness's own reader of the format (``dequantise``, below; not GPT-QModel's), so the split's runtime
share is also a check that the kernels compute the file's weights.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess as sp
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.core.errors import InputError
from harness.subjects import NOT_INSTALLED, register
from harness.subjects.subprocess import (VENVS, WorkerError, WorkerSubject, _tail, options, positive,
                                         venv_subject, worker_env)

KIND = "gptq"
OPTIONS = {"bits": "4 or 8 (default 4)", "group": "group size, or -1 for one per output channel (default 128)",
           "desc_act": "1: act-order (default 0)", "sym": "0: asymmetric zero points (default 1)",
           "calib": "calibration windows of 256 tokens (default 64)", "damp": "GPTQ's dampening (default 0.05)",
           "plant": "a planted bug (--plant's names for gptq)", "threads": "torch threads in the worker",
           "timeout": "seconds per call; quantising gets ten times as long"}
CALIB_CTX = 256
CANNOT = {
    "padding": "not wired: the worker exchanges token ids only",
    "hooks": "the model runs in another process: no per-layer captures",
    "dtype:float64": "GPT-QModel's kernels compute in float32 at best",
    "dtype:bfloat16": "not measured: the budgets hold for float32 activations (the CPU kernels' own dtype)",
    "dtype:float16": "not measured: the budgets hold for float32 activations (the CPU kernels' own dtype)",
}


# --- the format ----------------------------------------------------------------------------------

def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32 // bits values each, lowest bits first, along ``dim`` (GPTQ's packing
    of qweight along the input dimension and of qzeros along the output dimension)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    per = len(shifts)
    x = packed.to(torch.int32).movedim(dim, -1)
    vals = (x.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*x.shape[:-1], x.shape[-1] * per).movedim(-1, dim)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of ``unpack``."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    per = len(shifts)
    x = values.to(torch.int64).movedim(dim, -1)
    words = (x.reshape(*x.shape[:-1], x.shape[-1] // per, per) << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)     # as int32's two's complement
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def dequantise(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int) -> torch.Tensor:
    """One linear's weight (out, in) from a GPTQ checkpoint (``checkpoint_format = "gptq"``, v1):
    W[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + 1)) with g = g_idx[i]. v1 stores each
    zero point minus one (v2, GPT-QModel's internal format, stores the zero point itself)."""
    q = unpack(qweight, bits, 0).float()                 # (in, out)
    zeros = unpack(qzeros, bits, 1).float() + 1          # (groups, out)
    g = g_idx.long()
    return (scales.float()[g] * (q - zeros[g])).T.contiguous()


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The folder's weights as an HF-layout float state dict (each quantised linear dequantised)
    and its bits."""
    from safetensors.torch import load_file
    config = json.loads((folder / "quantize_config.json").read_text(encoding="utf-8"))
    bits = int(config["bits"])
    if config.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{folder}: checkpoint_format {config.get('checkpoint_format')!r}, the reader knows 'gptq'")
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw.update(load_file(str(f)))
    state = {}
    for name, t in raw.items():
        if name.endswith(".qweight"):
            p = name[:-len(".qweight")]
            state[p + ".weight"] = dequantise(t, raw[p + ".qzeros"], raw[p + ".scales"], raw[p + ".g_idx"], bits)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = t.float()
    return state, bits


# --- the build -----------------------------------------------------------------------------------

def calibration(source, windows: int) -> torch.Tensor:
    """(windows, 256) token ids, BOS first: the pydoc topics' paragraphs that are not held out (the
    fidelity table measures the held-out ones), as GPTQ users calibrate on text like the model's."""
    import sentencepiece as spm

    from harness.core import corpus
    if source.tokenizer is None:
        raise InputError("--subject gptq: GPT-QModel needs the model's tokenizer.model, and none is at hand")
    def words(s: str) -> str:       # the held-out file has the paragraphs reflowed
        return " ".join(s.split())
    # The topics repeat sentences across paragraphs ("for" and "while" share their "else" clause's):
    # a paragraph holding any sentence of the held-out text is left out with it.
    held = {s for p in corpus.text_of("heldout", None)[1].split("\n\n") for s in re.split(r"(?<=[.:;])\s", words(p))
            if len(s) >= 40}
    _, text = corpus.text_of("pydoc-topics", None)
    text = "\n\n".join(p for p in text.split("\n\n") if not any(s in flat for flat in [words(p)] for s in held))
    w = corpus.windows("gptq-calibration", text, spm.SentencePieceProcessor(model_file=str(source.tokenizer)),
                       CALIB_CTX, None)
    if w.ids.shape[0] < windows:
        raise InputError(f"--subject gptq:calib={windows}: the calibration text has {w.ids.shape[0]} windows")
    return w.ids[:windows]


def _env(source) -> dict:
    """GPT-QModel's JIT-compiled kernels go beside the builds, not under the user's home."""
    return {"GPTQMODEL_TORCH_EXTENSIONS_DIR": str(source.cache / "gptq-kernels")}


def quantised_folder(source, job: dict, calib: torch.Tensor, timeout: float) -> Path:
    """The model folder GPT-QModel wrote for these weights, options, calibration, venv and worker
    script, built once in the cache (harness.subjects.common.built). Beside it: ``job.json`` (the
    options it was quantised with) and GPT-QModel's log."""
    import numpy as np

    from harness.subjects.common import built, cache_key
    venv = VENVS[KIND]
    ids = calib.to(torch.int64).numpy()
    tool = {**job, "venv": venv.key(), "calib": hashlib.sha256(ids.tobytes()).hexdigest(),
            "worker": hashlib.sha256(venv.worker.read_bytes()).hexdigest()}
    folder = source.cache / KIND / cache_key(source, tool)
    with built(folder) as tmp:
        if tmp is not None:
            np.save(tmp / "calibration.npy", ids, allow_pickle=False)
            (tmp / "job.json").write_text(json.dumps(job, indent=1) + "\n", encoding="utf-8")
            full = {**job, "hf_dir": str(source.hf_path()), "tokenizer_model": str(source.tokenizer),
                    "calibration": str(tmp / "calibration.npy"), "out": str(tmp / "model")}
            (tmp / "quantise.json").write_text(json.dumps(full), encoding="utf-8")
            log = tmp / "quantise.log"
            with open(log, "wb") as f:
                try:
                    rc = sp.run([str(venv.python(source.cache)), "-I", str(venv.worker), "quantise",
                                 str(tmp / "quantise.json")], stdout=f, stderr=sp.STDOUT,
                                env=worker_env(_env(source)), timeout=timeout,
                                cwd=tmp).returncode        # GPT-QModel writes logs/ into its working folder
                except sp.TimeoutExpired:
                    raise WorkerError(f"{KIND}: quantising took longer than {timeout:.0f} s "
                                      "(ten times gptq:timeout=)") from None
            if rc != 0 or not (tmp / "model" / "quantize_config.json").is_file():
                raise WorkerError(f"{KIND}: GPT-QModel could not quantise the model (exit {rc})\n{_tail(log)}")
    return folder / "model"


@dataclass
class GptqSubject(WorkerSubject):
    """A WorkerSubject on a quantised folder, which the harness can read back for the split."""
    source: Any = None
    folder: Path | None = None
    planted: tempfile.TemporaryDirectory | None = None

    @property
    def exact(self) -> bool:
        return False

    def dequantised(self):
        from harness.subjects.common import dequantised_checkpoint, meta_state
        state, _ = read_folder(self.folder)
        return dequantised_checkpoint(self.source.ckpt, meta_state(state, self.source.ckpt.args))

    def close(self) -> None:
        super().close()
        if self.planted is not None:
            self.planted.cleanup()
            self.planted = None


@register(KIND)
def gptq_subject(source, dtype: str, device: str, opts: dict):
    from harness.core.faults import get_subject_fault
    opts = options(KIND, opts, OPTIONS)
    bits = int(positive(KIND, "bits", opts.get("bits"), 4, whole=True))
    if bits not in (4, 8):
        raise InputError(f"--subject gptq:bits={bits}: 4 or 8 (the widths with a measured budget; 3-bit packing "
                         "crosses words and is not read here)")
    group = -1 if opts.get("group") == "-1" else int(positive(KIND, "group", opts.get("group"), 128, whole=True))
    flags = {}
    for key, default in (("desc_act", "0"), ("sym", "1")):
        if opts.get(key, default) not in ("0", "1"):
            raise InputError(f"--subject gptq:{key}={opts[key]}: 0 or 1")
        flags[key] = opts.get(key, default) == "1"
    calib = int(positive(KIND, "calib", opts.get("calib"), 64, whole=True))
    damp = positive(KIND, "damp", opts.get("damp"), 0.05)
    fault = get_subject_fault(opts["plant"], KIND, f"gptq:plant={opts['plant']}") if "plant" in opts else None
    threads = positive(KIND, "threads", opts.get("threads"), None, whole=True)
    settings = {"bits": bits, "group": group, "desc_act": int(flags["desc_act"]), "sym": int(flags["sym"]),
                "calib": calib, **({"damp": damp} if "damp" in opts else {})}
    subject = venv_subject(KIND, source, dtype, device, opts, dtypes=("float32",),
                           cannots=CANNOT, start={"threads": threads},
                           settings={**settings, **({"plant": fault.name} if fault else {})}, env=_env(source),
                           cls=GptqSubject)
    subject.source = source
    args = source.ckpt.args
    if group != -1 and any(n % group for n in (args.dim, args.ffn_hidden)):
        raise InputError(f"--subject gptq:group={group}: must divide the model's widths ({args.dim}, {args.ffn_hidden})")
    if NOT_INSTALLED in subject.cannots:
        return subject
    job = {"bits": bits, "group": group, **flags, "damp": damp, "threads": threads}
    folder = quantised_folder(source, job, calibration(source, calib), 10 * subject.call_timeout)
    if fault is not None:                 # planted in a copy, never in the cache
        subject.planted = tempfile.TemporaryDirectory(prefix="llama-parity-gptq-plant-")
        copy = Path(subject.planted.name) / "model"
        shutil.copytree(folder, copy)
        fault.edit_built(copy)
        folder = copy
    subject.folder = folder
    subject.start["model_dir"] = str(folder)
    return subject

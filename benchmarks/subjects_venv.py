"""Fidelity of the venv subjects (vLLM CPU, torchtune, llama-models) against the float64 oracle.

    python benchmarks/subjects_venv.py                       every installed kind, float32 and bfloat16
    python benchmarks/subjects_venv.py --kinds vllm --dtypes float32 --ctx 128 --max-tokens 1024
    python benchmarks/subjects_venv.py --json out.json       the rows, with provenance, as JSON

On the embedded model's held-out corpus (harness/core/corpus.py: windows of --ctx tokens, BOS
first), each subject's full next-token distributions at every position are compared with the
oracle's (the reference in float64) by harness.core.metrics: llama.cpp's ``perplexity
--kl-divergence`` set (mean / median / p99 / p99.9 / max KL, same top-1, RMS delta-p, PPL ratio).
The reference itself at the same dtype is printed first, as the yardstick an exact implementation
is judged against; the last column is each subject's largest |difference| from it (0: bit for bit
the reference's numbers). A kind whose venv is missing is listed n/a with the command that creates it.
Install sizes and times come from each venv's installed.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.core import cache_dir, corpus  # noqa: E402
from harness.core.checkpoints import HFFolder, open_model  # noqa: E402
from harness.core.metrics import corpus_stats, position_stats  # noqa: E402
from harness.core.presets import default_model  # noqa: E402
from harness.core.subjects import ReferenceSubject  # noqa: E402
from harness.subjects import KINDS, Source, parse_spec  # noqa: E402
from harness.subjects import subprocess as subproc  # noqa: E402

import harness.subjects.llama_models  # noqa: F401,E402  (each registers its kind)
import harness.subjects.torchtune  # noqa: F401,E402
import harness.subjects.vllm  # noqa: F401,E402

COLUMNS = [("kl_mean", "mean KLD"), ("kl_median", "median"), ("kl_p99", "p99"), ("kl_p99_9", "p99.9"),
           ("kl_max", "max KLD"), ("same_top1", "same top1"), ("rms_dp", "RMS dp"), ("ppl_ratio", "PPL ratio")]


def open_source(model: str | None) -> tuple[Source, list]:
    folder = open_model(model or default_model())
    ckpt = folder.load()
    held: list[HFFolder] = []

    def hf_path() -> Path:
        if not held:
            held.append(HFFolder(ckpt))
        return held[0].path
    fingerprint = hashlib.sha256(json.dumps(folder.fingerprint()).encode()).hexdigest()
    return Source(ckpt, fingerprint, hf_path, None, cache_dir() / "subjects"), held


def stats_of(logits: torch.Tensor, truth: torch.Tensor, targets: torch.Tensor) -> dict:
    return corpus_stats(position_stats(logits, truth, targets=targets))


def fmt(key: str, v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if key == "same_top1":
        return f"{100 * v:.2f}%"
    if key == "ppl_ratio":
        return f"{v:.6f}"
    return f"{v:.2e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="vllm,vllm:out=logprobs,torchtune,llama-models",
                   help="subject specs, comma-free list separated by ';' or the default set")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--model", default=None, help="model folder (default: the embedded tiny Llama 2)")
    p.add_argument("--corpus", default="heldout")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args()
    specs = [s for s in (a.kinds.split(";") if ";" in a.kinds else _split_specs(a.kinds)) if s]
    source, held = open_source(a.model)
    from harness.core.real_tokenizer import ensure_tokenizer_model
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(ensure_tokenizer_model()))
    label, text = corpus.text_of(a.corpus, None)
    w = corpus.windows(label, text, sp, a.ctx, a.max_tokens)
    print(f"corpus {label}: {w.ids.shape[0]} windows x {a.ctx} tokens ({w.ids.numel()} positions, {w.tokens} text "
          "tokens), "
          f"model {source.ckpt.path.name}")
    t0 = time.perf_counter()
    with torch.inference_mode():
        truth = ReferenceSubject(source.ckpt, "float64", "cpu", oracle=True).logits(w.ids)
    print(f"oracle (float64): {time.perf_counter() - t0:.1f} s\n")

    rows = []
    head = (f"{'subject':28s} {'dtype':9s} " + " ".join(f"{h:>10s}" for _, h in COLUMNS)
            + f" {'max|d ref|':>10s}   seconds")
    for dtype in a.dtypes.split(","):
        print(head)
        with torch.inference_mode():
            ref = ReferenceSubject(source.ckpt, dtype, "cpu").logits(w.ids).float()
        rows.append(_row("reference", dtype, stats_of(ref, truth, w.targets), {}, 0.0, vs_ref=0.0))
        for spec in specs:
            s = parse_spec(spec)
            subject = KINDS[s.kind](source, dtype, "cpu", s.options)
            if "run" in subject.cannot():
                rows.append(_row(spec, dtype, None, subject.provenance(), 0.0, subject.cannot()["run"]))
                continue
            t = time.perf_counter()
            try:
                got = subject.forward(w.ids)
                prov = subject.provenance()
            except subproc.WorkerError as e:
                rows.append(_row(spec, dtype, None, subject.provenance(), time.perf_counter() - t, f"failed: {e}"))
                continue
            finally:
                subject.close()
            # How far from the reference at the same dtype (in log-softmax space for a log-prob subject).
            mine = ref if "logits" not in subject.cannot() else torch.log_softmax(ref, dim=-1)
            rows.append(_row(spec, dtype, stats_of(got, truth, w.targets), prov, time.perf_counter() - t,
                             vs_ref=(got - mine).abs().max().item()))
        print()
    print("Install (installed.json of each venv):")
    for kind, venv in sorted(subproc.VENVS.items()):
        info = venv.installed(source.cache)
        print(f"  {kind:13s} " + (f"{info['bytes'] / 2**20:7.0f} MiB  {info['install_seconds']:6.0f} s  "
                                  f"{venv.path(source.cache).name}" if info else "absent: " + venv.setup_command()))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    for h in held:
        h.close()
    return 0


def _split_specs(text: str) -> list[str]:
    """'vllm,vllm:out=logprobs,torchtune': a comma starts a new spec unless it follows key=value."""
    out: list[str] = []
    for part in text.split(","):
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _row(spec: str, dtype: str, stats: dict | None, prov: dict, seconds: float, na: str = "",
         vs_ref: float = math.nan) -> dict:
    if stats is None:
        print(f"{spec:28s} {dtype:9s} n/a: {na}")
    else:
        print(f"{spec:28s} {dtype:9s} " + " ".join(f"{fmt(k, stats[k]):>10s}" for k, _ in COLUMNS)
              + f" {vs_ref:10.2e}   {seconds:7.1f}")
    return {"subject": spec, "dtype": dtype, "stats": stats, "provenance": prov, "seconds": seconds, "na": na,
            "max_abs_vs_reference": vs_ref}


if __name__ == "__main__":
    sys.exit(main())

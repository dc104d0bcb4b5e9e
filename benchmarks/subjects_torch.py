"""Fidelity of the torch-side subjects (transformers variants, torchao, quanto, bitsandbytes, ONNX Runtime,
onnxruntime-genai, and GPTQ, whose worker runs in its own venv) against the float64 oracle on real text, in llama.cpp's
``perplexity --kl-divergence`` layout, with the error split for lossy subjects.

    python benchmarks/subjects_torch.py                       # every subject whose package is installed
    python benchmarks/subjects_torch.py --subjects "torchao:quant=int8wo;quanto:weights=int4"

For each subject: build (and compile/export) seconds, then over the held-out corpus windows
(harness/core/corpus.py: 8 windows of 128 tokens, 1016 predicted positions, as issue 22 measured) the mean,
median, 99%, 99.9% and max KL of the oracle's next-token distribution to the subject's, top-1
agreement, RMS of p(next token) differences and the perplexity ratio. For a subject with
``dequantised()`` weights the oracle is run again on those weights: ``quant KLD`` is that oracle
against the true one (weight quantisation alone), ``runtime KLD`` the subject against it (what
the runtime's own arithmetic adds: activation quantisation, kernels).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from harness.core import corpus  # noqa: E402
from harness.core.checkpoints import open_model  # noqa: E402
from harness.core.metrics import cat_stats, corpus_stats, position_stats  # noqa: E402
from harness.core.subjects import ReferenceSubject  # noqa: E402
from harness.subjects import KINDS, parse_spec  # noqa: E402
from harness.subjects.common import dequantised_checkpoint, source_of  # noqa: E402

DEFAULT = ["transformers", "transformers:compile=1", "transformers:cache=static,compile=1",
           "torchao:quant=int8wo", "torchao:quant=int8dyn", "quanto:weights=int8", "quanto:weights=int4",
           "bitsandbytes:quant=nf4", "bitsandbytes:quant=nf4,double=1,compute=bfloat16", "bitsandbytes:quant=fp4",
           "bitsandbytes:quant=int8",
           "onnxruntime", "onnxruntime-genai:precision=fp32", "onnxruntime-genai:precision=int4",
           "gptq", "gptq:bits=8"]
PACKAGES = {"torchao": "torchao", "quanto": "optimum.quanto", "bitsandbytes": "bitsandbytes", "onnxruntime": "onnxruntime",
            "onnxruntime-genai": "onnxruntime_genai"}


def load_kinds() -> None:
    import importlib
    for module in ("transformers", "torchao", "quanto", "bnb", "onnx", "ortgenai", "gptq"):
        importlib.import_module(f"harness.subjects.{module}")


def installed(kind: str) -> bool:
    from harness.subjects.common import has_module
    from harness.subjects.subprocess import VENVS
    if kind in VENVS:
        return VENVS[kind].installed() is not None
    return kind not in PACKAGES or has_module(PACKAGES[kind])


def stats_over(batches, run, truths) -> dict:
    parts = [position_stats(run(ids), truth, targets=targets) for (ids, targets), truth in zip(batches, truths)]
    return corpus_stats(cat_stats(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the embedded model)")
    p.add_argument("--subjects", help="comma-free list separated by ';' (default: all installed)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args()
    load_kinds()
    specs = [parse_spec(s) for s in (a.subjects.split(";") if a.subjects else DEFAULT)]
    folder = open_model(a.model)
    ckpt = folder.load()
    source = source_of(folder, ckpt)
    sp, _ = corpus.tokenizer_for(folder.path, ckpt.args.vocab_size, None)
    label, text = corpus.text_of("heldout", None)
    w = corpus.windows(label, text, sp, a.ctx, a.max_tokens)
    batches = list(w.batches(a.batch))
    oracle = ReferenceSubject(ckpt, "float64", "cpu", oracle=True)
    truths = [oracle.logits(ids) for ids, _ in batches]
    print(f"model {folder.path.name}, corpus {label}: {w.ids.shape[0]} windows x {a.ctx} = {w.ids.numel()} positions, "
          f"dtype {a.dtype}, torch threads {torch.get_num_threads()}", flush=True)
    head = ("| subject | build s | first fwd s | Mean KLD | Median KLD | 99% KLD | 99.9% KLD | Max KLD | Same top1 % | "
            "RMS Δp % | PPL ratio | quant KLD | runtime KLD |")
    lines = [head, "|" + "---|" * 13]
    for spec in specs:
        if not installed(spec.kind):
            print(f"skip {spec.label()}: {PACKAGES.get(spec.kind, 'its venv')} is not installed", flush=True)
            continue
        started = time.perf_counter()
        try:
            subject = KINDS[spec.kind](source, a.dtype, "cpu", dict(spec.options))
        except Exception as e:         # one subject that cannot be built is a line, not the end of the table
            print(f"fail {spec.label()}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)
            continue
        built = time.perf_counter() - started
        # a subject with its own cache setting is measured through its decode: a prefill of a
        # quarter window, then one token per step (what cache=static,compile=1 is about)
        run = (lambda ids: subject.decode(ids, a.ctx // 4)) if "cache" in subject.settings() else subject.forward
        started = time.perf_counter()
        first = run(batches[0][0])
        first_s = time.perf_counter() - started
        del first
        c = stats_over(batches, run, truths)
        split = ["", ""]
        deq = subject.dequantised() if hasattr(subject, "dequantised") else None
        if deq is not None:
            q_oracle = ReferenceSubject(dequantised_checkpoint(ckpt, deq), "float64", "cpu", oracle=True)
            q_truths = [q_oracle.logits(ids) for ids, _ in batches]
            quant = stats_over(batches, lambda ids, it=iter(q_truths): next(it), truths)
            runtime = stats_over(batches, run, q_truths)
            split = [f"{quant['kl_mean']:.3g}", f"{runtime['kl_mean']:.3g}"]
            del q_oracle, q_truths
        lines.append("| " + " | ".join([
            spec.label(), f"{built:.1f}", f"{first_s:.1f}", f"{c['kl_mean']:.3g} ± {c['kl_mean_se']:.1g}",
            f"{c['kl_median']:.3g}", f"{c['kl_p99']:.3g}", f"{c['kl_p99_9']:.3g}", f"{c['kl_max']:.3g}",
            f"{100 * c['same_top1']:.2f}", f"{100 * c['rms_dp']:.3g}", f"{c['ppl_ratio']:.5f}", *split]) + " |")
        print(lines[-1], flush=True)
        prov = subject.provenance()
        print(f"  provenance: {prov}", flush=True)
        subject.close()
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

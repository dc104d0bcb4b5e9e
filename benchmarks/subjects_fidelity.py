"""The fidelity table: every --subject against the float64 oracle on real text, in llama.cpp's layout.

    python benchmarks/subjects_fidelity.py --subject llama.cpp:quant=F32,kv=f32 --subject llama.cpp:quant=Q8_0
    python benchmarks/subjects_fidelity.py --preset slice-7b --subject llama.cpp:quant=Q4_K_M ...

For each subject spec (any registered kind, harness.subjects): build it, run the corpus windows
(the embedded model's held-out text by default, ``--ctx`` tokens each, BOS first), and print
llama.cpp's ``perplexity --kl-divergence`` columns against the oracle (mean / median / p99 / p99.9 /
max KLD, same top-1, RMS delta-p, PPL ratio), plus the error split for lossy subjects that can
hand back their dequantised weights (KL of the oracle on those weights to the oracle: the
weights' part; KL of the subject to it: the runtime's part). The reference at float32 is the
first row: what an exact float32 implementation reaches. ``--judge`` adds each subject's verdict
(exact: the logits rule at float32; lossy: its budget in suites/subjects_tolerance.toml).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.core.metrics import corpus_stats, position_stats  # noqa: E402
from harness.subjects import fidelity  # noqa: E402

COLUMNS = ("Mean KLD", "Median KLD", "99% KLD", "99.9% KLD", "Max KLD", "Same top p", "RMS Δp", "PPL ratio",
           "KLD weights", "KLD runtime")


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.3f} %" if pct else f"{x:.3g}"


def line(label: str, c: dict, split: dict, verdict: str = "") -> str:
    cells = [fmt(c["kl_mean"]), fmt(c["kl_median"]), fmt(c["kl_p99"]), fmt(c["kl_p99_9"]), fmt(c["kl_max"]),
             fmt(c["same_top1"], pct=True), fmt(c["rms_dp"], pct=True), f"{c['ppl_ratio']:.6f}",
             fmt(split.get("weights_kl_mean")), fmt(split.get("runtime_kl_mean"))]
    return "| " + " | ".join([label, *cells, *([verdict] if verdict else [])]) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", action="append", required=True, help="KIND[:key=value,...] (repeatable)")
    p.add_argument("--model", help="model folder (default: the embedded tiny-llama2)")
    p.add_argument("--preset", help="a synthetic preset instead (e.g. slice-7b: shapes that are multiples of 256)")
    p.add_argument("--corpus", default="heldout")
    p.add_argument("--ctx", type=int, default=128, help="tokens per window, BOS first (128)")
    p.add_argument("--max-tokens", type=int, default=1024, help="text tokens used (1024: 8 windows, 1016 tokens)")
    p.add_argument("--judge", action="store_true", help="add each subject's verdict")
    p.add_argument("--no-split", action="store_true", help="skip the error split (one oracle pass per lossy subject)")
    p.add_argument("--json", help="also write every figure and each subject's provenance here")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    source = fidelity.open_source(a.model, a.preset)
    windows = fidelity.corpus_windows(source, a.corpus, a.ctx, a.max_tokens)
    truth = fidelity.oracle_logits(source.ckpt, windows.ids)
    print(f"model {a.preset or a.model or 'tiny-llama2 (embedded)'}: {windows.ids.shape[0]} windows x {a.ctx} "
          f"tokens of {windows.name} ({windows.tokens} text tokens); oracle {time.perf_counter() - t0:.0f} s",
          flush=True)
    ref32 = fidelity.oracle_logits(source.ckpt, windows.ids, dtype="float32")
    ref_stats = position_stats(ref32, truth, targets=windows.targets)
    del ref32
    head = "| subject | " + " | ".join(COLUMNS) + (" | verdict |" if a.judge else " |")
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1 + a.judge),
            line("reference float32", corpus_stats(ref_stats), {}, "(the exact standard)" if a.judge else "")]
    report = {"model": a.preset or a.model or "tiny-llama2", "corpus": windows.name, "ctx": a.ctx,
              "tokens": windows.tokens, "subjects": []}
    budgets = fidelity.load_budgets()[1] if a.judge else []
    for spec in a.subject:
        t = time.perf_counter()
        subject = fidelity.build(spec, source)
        try:
            f = fidelity.measure(subject, spec, windows, truth, split=False if a.no_split else None)
        finally:
            subject.close()
        if f.na:
            rows.append(f"| {spec} | n/a: {f.na} |")
            print(rows[-1], flush=True)
            continue
        verdict = ""
        if a.judge:
            if getattr(subject, "exact", False):
                judged = fidelity.judge_exact(f.stats, ref_stats)
                rule = "exact"
            else:
                budget = fidelity.budget_for(subject.name, f.settings, budgets)
                judged = fidelity.judge_lossy(f, budget) if budget else []
                rule = "budget" if budget else "no budget"
            failed = [f"{m} {r}" for m, _, _, status, r in judged if status == "fail"]
            verdict = f"{rule}: " + ("pass" if judged and not failed else "; ".join(failed) or "-")
        rows.append(line(spec, f.corpus, f.split, verdict))
        prov = f.provenance
        print(f"{rows[-1]}\n    {time.perf_counter() - t:.0f} s (forward {f.seconds:.1f} s); "
              + "; ".join(f"{k} {json.dumps(prov[k])}" for k in ("tensor_types", "fallbacks", "kv_cache") if k in prov),
              flush=True)
        report["subjects"].append({"spec": spec, "settings": f.settings, "corpus": f.corpus, "split": f.split,
                                   "provenance": prov, "verdict": verdict, "seconds": f.seconds})
    print()
    print("\n".join(rows))
    print(f"\n{len(ref_stats)} positions per row; truth: the float64 oracle (reference in float64, RoPE angles "
          "too). KLD weights: KL(oracle || oracle on the subject's dequantised weights); KLD runtime: "
          "KL(that || subject).")
    if rows and report["subjects"] and "system_info" in report["subjects"][0]["provenance"]:
        print(f"build: {report['subjects'][0]['provenance']['system_info']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())

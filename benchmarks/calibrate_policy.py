"""The evidence behind suites/tolerance.toml: how close a correct transformers comes to its limits,
what false-alarm rate that implies, and how far each planted bug lands beyond them.

    python benchmarks/calibrate_policy.py                        # 7 models x seeds 1-12, then the faults
    python benchmarks/calibrate_policy.py --seeds 1-40 --write   # and rewrite the calibration block

Clean runs (no plant, seeds other than 0) give, for every gated transformers value, v / t (the
value over the limit it was judged by; above 1 the cell fails). Per (dtype, metric) a normal fit
of log(v / t) gives the chance that one such value crosses 1; summed over the values of one
default run, the false-alarm rate a run implies. Planted runs give the smallest v / t of each fault
on its best metric: a policy is good when the first is far below 1 and the second far above it.
--write puts the figures between the calibration markers of suites/tolerance.toml.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from false_alarms import models, run, seeds  # noqa: E402

MARK_BEGIN = "# --- calibration: written by benchmarks/calibrate_policy.py --write"
MARK_END = "# --- end of calibration"
MODELS = "tiny-mha,tiny-gqa,tiny-ffnmult,tiny-outliers,default,tiny-llama2,long-hd128"


def values(summary: dict) -> list[dict]:
    """Every gated transformers value with its limit (metrics that have a relative limit)."""
    out = []
    for c in summary["cells"]:
        if c["subject"] != "transformers" or c["against"] != "oracle-fp64" or c["status"] not in ("pass", "fail"):
            continue
        v, t = c["value"], c["tolerance"]
        if not isinstance(v, (int, float)) or not isinstance(t, (int, float)) or t <= 0:
            continue
        out.append({**c["case"], "metric": c["metric"], "value": v, "tolerance": t, "v_over_t": v / t,
                    "status": c["status"]})
    return out


def tail(df: pd.DataFrame) -> pd.DataFrame:
    """Per (dtype, metric): the worst v/t seen and the chance a value crosses 1 (normal fit of log v/t)."""
    rows = []
    for (dtype, metric), g in df.groupby(["dtype", "metric"]):
        x = [math.log(v) for v in g["v_over_t"] if v > 0]
        if len(x) < 5:
            continue
        mu = sum(x) / len(x)
        sd = max((sum((a - mu) ** 2 for a in x) / (len(x) - 1)) ** 0.5, 1e-9)
        p = 0.5 * math.erfc(-mu / sd / math.sqrt(2))          # P(log v/t > 0) under the fit
        rows.append({"dtype": dtype, "metric": metric, "n": len(g), "worst v/t": g["v_over_t"].max(),
                     "median v/t": g["v_over_t"].median(), "p(cross) fit": p})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=MODELS)
    p.add_argument("--seeds", default="1-12")
    p.add_argument("--shapes", default="1x16,2x64,1x256")
    p.add_argument("--text-seeds", default=None, help="seeds for the models measured on real text (default: --seeds)")
    p.add_argument("--max-tokens", default="2048", help="real-text tokens per run")
    p.add_argument("--faults", default="")
    p.add_argument("--write", action="store_true", help="rewrite the calibration block of suites/tolerance.toml")
    a = p.parse_args()
    from harness.core.faults import FAULTS, faults_for
    faults = a.faults.split(",") if a.faults else faults_for("logits")
    base = ["--dtypes", "float32,bfloat16,float16", "--attn", "eager,sdpa", "--tp", "1", "--shapes", a.shapes]
    clean, planted, failed_runs, n_runs, started = [], [], [], 0, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        zoo = models(a.models.split(","), Path(tmp))
        for name, model in zoo.items():
            # Real text where the Llama 2 tokenizer fits the model (its 32000-piece vocabulary).
            on_text = name in ("default", "tiny-llama2")
            text = ["--inputs", "random,padded,cached,corpus", "--max-tokens", a.max_tokens] \
                if on_text else ["--inputs", "random,padded,cached"]
            run_seeds = seeds(a.text_seeds if on_text and a.text_seeds else a.seeds)
            for seed in run_seeds:
                code, summary = run(model, seed, Path(tmp) / "run", base + text)
                n_runs += 1
                failed_runs += [(name, seed)] if code else []
                clean += [{"model": name, "seed": seed, **v} for v in values(summary)]
            print(f"{name}: {len(run_seeds)} clean runs", flush=True)
        for fault in faults:
            f = FAULTS[fault]()
            if f.not_applicable():
                continue
            model = zoo.get(f.fixture if f.fixture in zoo else "tiny-gqa") or next(iter(zoo.values()))
            shapes = "1x16,2x64,1x1536" if f.min_positions > 64 else "1x16,2x64"
            # a fault of the mask or the cache shows in the padded and cached cells
            cells = ["--inputs", ",".join(("random", *f.inputs))] if f.inputs else []
            code, summary = run(model, 0, Path(tmp) / "run", ["--dtypes", ",".join(f.visible_at), "--attn", "eager",
                                                              "--tp", "1", "--shapes", shapes, "--plant", fault, *cells])
            best = max((v["v_over_t"] for v in values(summary)), default=float("nan"))
            planted.append({"fault": fault, "dtypes": ",".join(f.visible_at), "exit": code, "best v/t": best})
    df = pd.DataFrame(clean)
    fit = tail(df)
    per_run = fit.assign(per_run=fit["p(cross) fit"] * fit["n"] / max(n_runs, 1))["per_run"].sum()
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.float_format", "{:.3g}".format):
        print(f"\n{n_runs} clean runs ({a.models}; seeds {a.seeds}, on text {a.text_seeds or a.seeds} with "
              f"{a.max_tokens} tokens; shapes {a.shapes}) in {time.time() - started:.0f} s: "
              f"{len(failed_runs)} failed {failed_runs[:10]}")
        print(fit.to_string(index=False))
        print(f"\nimplied false alarms per clean run (sum of the fitted chances over one run's values): {per_run:.2g}")
        print(pd.DataFrame(planted).to_string(index=False))
    if a.write:
        write_block(n_runs, a, fit, per_run, len(failed_runs), planted)


def write_block(n_runs, a, fit, per_run, n_failed, planted) -> None:
    path = ROOT / "suites" / "tolerance.toml"
    text = path.read_text(encoding="utf-8")
    worst = fit.sort_values("worst v/t", ascending=False).head(6)
    lines = [MARK_BEGIN, f"#   {n_runs} clean runs: models {a.models}; seeds {a.seeds} (on real text: "
             f"{a.text_seeds or a.seeds}, {a.max_tokens} tokens); shapes {a.shapes}, padded, cached;",
             "#   every dtype, eager and sdpa, tp 1; transformers "
             f"{__import__('transformers').__version__}, torch {__import__('torch').__version__} CPU.",
             f"#   failed runs: {n_failed}. Implied false alarms per run (normal fit of log v/t, summed): {per_run:.2g}.",
             "#   largest shares of that rate (dtype metric: fitted chance x values per run): " + ", ".join(
                 f"{r['dtype']} {r['metric']} {r['p(cross) fit'] * r['n'] / max(n_runs, 1):.2g}"
                 for _, r in fit.assign(share=fit["p(cross) fit"] * fit["n"]).sort_values(
                     "share", ascending=False).head(3).iterrows()) + ".",
             "#   worst v/t (value / limit) of a correct transformers, by metric:"]
    lines += [f"#     {r['dtype']:<9} {r['metric']:<20} worst {r['worst v/t']:.3g}  median {r['median v/t']:.3g}  "
              f"p(cross) {r['p(cross) fit']:.2g}  (n {r['n']})" for _, r in worst.iterrows()]
    low = sorted(planted, key=lambda r: r["best v/t"])[:6]
    lines += ["#   planted bugs, best v/t (least visible first):"]
    lines += [f"#     {r['fault']:<24} {r['best v/t']:.3g}  at {r['dtypes']}" for r in low]
    lines.append(MARK_END)
    block = "\n".join(lines)
    if MARK_BEGIN in text:
        start, end = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:start] + block + text[end:]
    else:
        text = text.replace("\nversion = ", "\n" + block + "\nversion = ", 1)
    path.write_text(text, encoding="utf-8")
    print(f"wrote the calibration block into {path}")


if __name__ == "__main__":
    main()

"""A campaign of clean `llama-parity bench` runs: the evidence behind suites/bench_tolerance.toml.

    python benchmarks/calibrate_bench.py                                   # embedded model, --limit 40
    python benchmarks/calibrate_bench.py --runs tiny-llama2:8,tiny-llama2:3,default:8 --limit 40
    python benchmarks/calibrate_bench.py --results /tmp/bench0              # judge runs already made
    python benchmarks/calibrate_bench.py --runs tiny-mha@1:4,tiny-gqa@2:1 --keep /tmp/camp  # resumable

A bench run has no seed: lm-eval scores the same documents the same way every time (the numbers of
two identical runs are identical), so a campaign varies what a user varies: the model (the embedded
trained model, the random `default` preset at other seeds, with the real tokenizer) and the batch
size (other padding, other kernels). Every run is clean (no plant), so every failing cell is a
false alarm. Prints the runs that failed, per (dtype, metric) n, worst and median v / t (value over
its limit; for McNemar's p, limit over value, since there smaller is worse) and the fitted chance
that one value crosses 1 (a normal fit of log v/t, as benchmarks/calibrate_policy.py does), and
the implied false alarms per run. Rates that were 0 in every run (choice flips, generation
mismatches at float32) carry no scale and are counted, not fitted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibrate_behaviour import _table, fit  # noqa: E402


def preset(name: str, root: Path) -> Path:
    """tiny-llama2 (the embedded model) or PRESET@SEED (a random preset: default, tiny-mha, tiny-gqa,
    tiny-ffnmult, ...). Presets with a smaller vocabulary get the real tokenizer's 32000 (the
    documents are tokenized by it; make-model --vocab-size does the same), so the shapes (MHA, GQA,
    an FFN multiplier) vary while the tokens stay those of the default run."""
    from harness.core.presets import PRESETS, default_model, write_preset
    if name == "tiny-llama2":
        return default_model()
    base, _, seed = name.partition("@")
    vocab = 32000 if PRESETS.get(base, {}).get("vocab_size", 32000) < 32000 else None
    out = root / name
    if (out / "params.json").exists():
        return out
    return write_preset(base, out, fmt="meta", seed=int(seed or 1), vocab_size=vocab)


def ratios(summary: dict) -> list[dict]:
    out = []
    for c in summary["cells"]:
        v, t = c.get("value"), c.get("tolerance")
        if c["status"] not in ("pass", "fail") or not isinstance(v, (int, float)) or not isinstance(t, (int, float)):
            continue
        if c["metric"] == "mcnemar_p":
            r = t / v if v > 0 else float("inf")
        else:
            r = v / t if t > 0 else (0.0 if v == 0 else float("inf"))     # config_drift: 0 allowed, 0 seen
        out.append({"dtype": c["case"].get("dtype"), "metric": c["metric"], "v_over_t": r, "status": c["status"],
                    "subject": f"{c.get('subject')}~{c.get('against')}"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="tiny-llama2:8",
                   help="MODEL:BATCH list (MODEL: tiny-llama2, or PRESET@SEED: default@1, tiny-gqa@2, ...)")
    p.add_argument("--limit", default="40")
    p.add_argument("--max-length", default="2048", help="bench --max-length (a smaller one fits a busy machine)")
    p.add_argument("--subjects", default="reference,hf,adapter-hf")
    p.add_argument("--results", nargs="*", default=[], help="bench results folders already made, judged too")
    p.add_argument("--keep", help="keep every run's folder here (a run whose summary.json is there is not run "
                                  "again: a cut-short campaign resumes and still counts)")
    a = p.parse_args()
    from harness.cli import main as cli
    summaries, failed, started = [], [], time.time()
    for folder in a.results:
        summaries.append((folder, json.loads((Path(folder) / "summary.json").read_text())))
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(a.keep) if a.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for spec in [r for r in a.runs.split(",") if r]:
            name, _, batch = spec.partition(":")
            out = Path(tmp) / f"run-{name}-{batch}"
            if (out / "summary.json").exists():
                summaries.append((spec, json.loads((out / "summary.json").read_text())))
                print(f"{spec}: kept from {out}", flush=True)
                continue
            argv = ["bench", "--model", str(preset(name, Path(tmp) / "models")), "--limit", a.limit,
                    "--batch-size", batch or "8",
                    "--max-length", a.max_length,
                    "--subjects", a.subjects, "--no-progress", "--out", str(out)]
            console = io.StringIO()
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                code = cli(argv)
            if code not in (0, 1):
                print(f"{spec}: exit {code} (not a verdict): {console.getvalue()[-600:]}", flush=True)
                continue
            summaries.append((spec, json.loads((out / "summary.json").read_text())))
            print(f"{spec}: exit {code} ({time.time() - started:.0f} s so far)", flush=True)
    records = []
    for name, s in summaries:
        rs = ratios(s)
        bad = [c for c in s["cells"] if c["status"] == "fail"]
        if bad:
            failed.append((name, bad))
        records += rs
        print(f"{name}: {len(bad)} failing cells, worst v/t {max((r['v_over_t'] for r in rs), default=0):.3g}")
    n = len(summaries)
    print(f"\n{n} clean runs (limit {a.limit}) in {time.time() - started:.0f} s: {len(failed)} failed")
    for name, bad in failed:
        print(f"  {name}: " + "; ".join(f"{c['case']} {c['metric']} {c['reason']}" for c in bad[:4]))
    _table(fit(records, n), "suites/bench_tolerance.toml")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

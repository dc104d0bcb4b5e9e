"""A campaign of clean `llama-parity logits` runs: how often does a correct transformers fail the gate?

    python benchmarks/false_alarms.py                                  # 5 models x 7 seeds, default matrix
    python benchmarks/false_alarms.py --seeds 1-40 --models tiny-gqa,default --shapes 1x16,2x64
    python benchmarks/false_alarms.py --policy suites/tolerance.toml --out reports/latest/campaign

Every run is a clean run (no planted bug) on a correct checkpoint with a seed other than 0, so
every failing cell is a false alarm. Prints the runs that failed, the failing metrics, and per
(dtype, metric) the distribution of transformers' value over the limit it was judged by (value /
tolerance: at 1 the cell fails). The rows of every run are written to --out/campaign.csv.
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

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def models(names: list[str], root: Path) -> dict[str, Path]:
    from harness.core.presets import default_model, write_preset
    out = {}
    for name in names:
        fmt = "hf" if name == "long-hd128" else "meta"      # its max_position_embeddings needs config.json
        out[name] = default_model() if name == "tiny-llama2" else write_preset(name, root / name, fmt=fmt)
    return out


def seeds(spec: str) -> list[int]:
    """'1-300', '3,7,9' or both: '870,1201-1300'."""
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def run(model: Path, seed: int, out: Path, extra: list[str]) -> tuple[int, dict]:
    from harness.cli import main
    argv = ["logits", "--model", str(model), "--seed", str(seed), "--out", str(out), "--no-progress",
            "--no-localise", "--no-resume", *extra]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    return code, json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mha,tiny-gqa,tiny-ffnmult,default,tiny-llama2")
    p.add_argument("--seeds", default="1-7")
    p.add_argument("--shapes", help="passed to --shapes (default: the suite's defaults)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--attn", default="eager,sdpa")
    p.add_argument("--policy")
    p.add_argument("--out", default="reports/latest/campaign")
    a = p.parse_args()
    extra = ["--dtypes", a.dtypes, "--attn", a.attn, "--tp", "1"]
    extra += ["--shapes", a.shapes] if a.shapes else []
    extra += ["--policy", a.policy] if a.policy else []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records, failed_runs, n_runs, started = [], [], 0, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models(a.models.split(","), Path(tmp)).items():
            for seed in seeds(a.seeds):
                code, summary = run(model, seed, Path(tmp) / "run", extra)
                n_runs += 1
                bad = [c for c in summary["cells"] if c["status"] == "fail"]
                if code != 0:
                    failed_runs.append((name, seed, code, bad))
                for c in summary["cells"]:
                    if c["subject"] != "transformers" or c["against"] != "oracle-fp64" or c["status"] not in ("pass", "fail"):
                        continue
                    v, t = c["value"], c["tolerance"]
                    ratio = v / t if isinstance(v, (int, float)) and isinstance(t, (int, float)) and t > 0 else None
                    records.append({"model": name, "seed": seed, **c["case"], "metric": c["metric"], "value": v,
                                    "tolerance": t, "value/tol": ratio, "status": c["status"]})
                print(f"{name} seed {seed}: exit {code}, {len(bad)} failing cells", flush=True)
    df = pd.DataFrame(records)
    df.to_csv(out / "campaign.csv", index=False)
    cells = df.groupby(["model", "seed", "dtype", "attn", "shape"]).status.apply(lambda s: (s == "fail").any())
    print(f"\n{n_runs} clean runs in {time.time() - started:.0f} s: {len(failed_runs)} failed "
          f"({len(failed_runs) / n_runs:.1%}); {int(cells.sum())} of {len(cells)} cells failed ({cells.mean():.2%})")
    for name, seed, code, bad in failed_runs:
        print(f"  {name} seed {seed} (exit {code}): " + "; ".join(
            f"{c['case']['dtype']}/{c['case']['attn']}/{c['case']['shape']} {c['metric']} {c['reason']}" for c in bad[:4]))
    q = df.groupby(["dtype", "metric"])["value/tol"].describe(percentiles=[0.5, 0.9, 0.99])
    with pd.option_context("display.width", 200, "display.max_rows", 100, "display.float_format", "{:.3g}".format):
        print("\nvalue / tolerance of every gated transformers cell (1 = the limit):")
        print(q[["count", "50%", "90%", "99%", "max"]])
    sys.exit(1 if failed_runs else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

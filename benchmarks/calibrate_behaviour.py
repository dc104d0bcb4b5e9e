"""A campaign of clean `llama-parity behaviour` runs: the evidence behind suites/behaviour_tolerance.toml.

    python benchmarks/calibrate_behaviour.py                                    # the default campaign
    python benchmarks/calibrate_behaviour.py --models tiny-llama2 --seeds 1-3 --suite padding,cache
    python benchmarks/calibrate_behaviour.py --policy /tmp/candidate.toml       # judge a candidate policy
    python benchmarks/calibrate_behaviour.py --keep --out /tmp/camp ...         # resumable: reruns skip done runs

Every run is clean (no planted bug, a correct transformers), so every failing cell is a false
alarm. For every gated cell (transformers and the reference alike: both are judged) it keeps
v / t, the value over the limit it was judged by (above 1 the cell fails), and prints

  - the runs that failed and their failing cells (the count the issue asks for),
  - per (dtype, metric): n, the worst and median v / t, and the fitted chance that one value
    crosses 1 (a normal fit of log v/t over the campaign, as benchmarks/calibrate_policy.py does),
  - the implied false alarms per run: the fitted chances summed over one run's values.

Cells whose value is exactly 0 (a cache that is bit-exact, an argmax that never moves) carry no
scale and are counted but left out of the fit. The rows are written to --out/behaviour_campaign.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from false_alarms import models, seeds  # noqa: E402

SUITES = "generate,cache,padding,seqcls,hidden"


def run(model: Path, seed: int, out: Path, extra: list[str]) -> tuple[int, list[dict]]:
    """One clean run; a folder that holds a finished run (its exit code in exit.txt) is read, not rerun."""
    from harness.cli import main
    done = out / "exit.txt"
    if done.exists():
        code = int(done.read_text())
    else:
        argv = ["behaviour", "--model", str(model), "--seed", str(seed), "--out", str(out), *extra]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(argv)
        if out.is_dir():
            done.write_text(f"{code}\n")
    cells = []
    for summary in sorted(out.glob("*/summary.json")):
        cells += json.loads(summary.read_text())["cells"]
    return code, cells


def ratios(cells: list[dict], policies: dict) -> list[dict]:
    """v / t of every gated cell under the policy it was run with, and under each of ``policies``
    (the same value and calibrator judged by another file: before/after figures from one campaign)."""
    out = []
    for c in cells:
        v, t = c.get("value"), c.get("tolerance")
        if c["status"] not in ("pass", "fail") or not isinstance(v, (int, float)) or not isinstance(t, (int, float)):
            continue
        if t <= 0 or c["metric"] in ("gen_divergence_margin", "pad_row_abs"):
            continue            # exact-zero limits and margins (judged the other way round) have no v/t scale
        cal = (c.get("extra") or {}).get("calibrator")
        rec = {"suite": c["suite"], "subject": c["subject"], "dtype": c["case"].get("dtype"),
               "metric": c["metric"], "value": v, "calibrator": cal, "tolerance": t, "v_over_t": v / t,
               "status": c["status"]}
        for name, pol in policies.items():
            if (rec["dtype"], rec["metric"]) not in pol.limits:
                rec[f"v_over_t@{name}"] = rec["v_over_t"]          # a contract row (api): no policy limit
                continue
            lim = pol.limit(rec["dtype"], rec["metric"]).allowed(rec["metric"], cal)
            rec[f"v_over_t@{name}"] = v / lim if lim > 0 else (0.0 if v == 0 else math.inf)
        out.append(rec)
    return out


def fit(records: list[dict], n_runs: int, key: str = "v_over_t") -> list[dict]:
    """Per (dtype, metric, subject): one subject's values share a scale. Pooled, the reference's
    cells (for seqcls, hidden and gen_step its value *is* the calibrator: v / t = 1 / factor every
    time) and transformers' spread log v/t over two modes, and the normal fit's tail crossed 1 for
    metrics that never came near it (5.7 implied false alarms per run on a 0-failure campaign)."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["dtype"], r["metric"], r.get("subject") or "-"), []).append(r[key])
    rows = []
    for (dtype, metric, subject), vals in sorted(groups.items()):
        x = [math.log(v) for v in vals if v > 0]
        p = float("nan")
        if len(x) >= 5:
            mu = sum(x) / len(x)
            sd = max((sum((a - mu) ** 2 for a in x) / (len(x) - 1)) ** 0.5, 1e-9)
            p = 0.5 * math.erfc(-mu / sd / math.sqrt(2))     # P(log v/t > 0) under the fit
        s = sorted(vals)
        rows.append({"dtype": dtype, "metric": metric, "subject": subject, "n": len(vals), "zeros": len(vals) - len(x),
                     "worst": s[-1], "median": s[len(s) // 2], "p_cross": p,
                     "per_run": (p if p == p else 0.0) * len(x) / max(n_runs, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-llama2,tiny-gqa,tiny-mha")
    p.add_argument("--seeds", default="0-5")
    p.add_argument("--suite", default=SUITES)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--attn", default="eager,sdpa")
    p.add_argument("--policy", help="the policy the runs are judged with (default: suites/behaviour_tolerance.toml)")
    p.add_argument("--also", action="append", default=[],
                   help="NAME=FILE: judge the same values under another policy too (e.g. before=old.toml)")
    p.add_argument("--out", default="reports/latest/behaviour_campaign")
    p.add_argument("--keep", action="store_true",
                   help="keep every run's folder under --out/runs (a finished run found there is read, not rerun: "
                        "a cut-short campaign resumes and still counts)")
    p.add_argument("--only-kept", action="store_true",
                   help="with --keep: judge the finished runs found there, run none "
                        "(the table of a cut-short campaign)")
    a = p.parse_args()
    from harness.core.tolerance import load_policy
    policies = {n: load_policy(f) for n, f in (x.split("=", 1) for x in a.also)}
    extra = ["--suite", a.suite, "--dtypes", a.dtypes, "--attn", a.attn] + (["--policy", a.policy] if a.policy else [])
    records, failed, n_runs, started = [], [], 0, time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(a.out) / "runs" if a.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for name, model in models(a.models.split(","), Path(scratch)).items():
            for seed in seeds(a.seeds):
                if a.only_kept and not (tmp / f"run-{name}-{seed}" / "exit.txt").exists():
                    continue
                code, cells = run(model, seed, tmp / f"run-{name}-{seed}", extra)
                n_runs += 1
                bad = [c for c in cells if c["status"] == "fail"]
                if code != 0:
                    failed.append((name, seed, code, bad))
                rs = ratios(cells, policies)
                records += [{"model": name, "seed": seed, **r} for r in rs]
                worst = max((r["v_over_t"] for r in rs), default=0.0)
                also = "".join(f"; under {n}: {sum(r[f'v_over_t@{n}'] > 1 for r in rs)} failing cells" for n in policies)
                print(f"{name} seed {seed}: exit {code}, {len(bad)} failing cells, worst v/t {worst:.3g}{also} "
                      f"({time.time() - started:.0f} s so far)", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "behaviour_campaign.csv", "w", encoding="utf-8") as f:
        keys = ["model", "seed", "suite", "subject", "dtype", "metric", "value", "calibrator", "tolerance",
                "v_over_t", "status", *(f"v_over_t@{n}" for n in policies)]
        f.write(",".join(keys) + "\n")
        f.writelines(",".join(str(r[k]) for k in keys) + "\n" for r in records)
    print(f"\n{n_runs} clean runs ({a.models}; seeds {a.seeds}; suites {a.suite}) in {time.time() - started:.0f} s: "
          f"{len(failed)} failed")
    for name, seed, code, bad in failed:
        print(f"  {name} seed {seed} (exit {code}): " + "; ".join(
            f"{c['suite']} {c['subject']} {c['case'].get('dtype')} {c['metric']} {c['reason']}" for c in bad[:4]))
    for n in policies:
        runs = {(r["model"], r["seed"]) for r in records if r[f"v_over_t@{n}"] > 1}
        print(f"under {n}: {len(runs)} of {n_runs} runs would fail: {sorted(runs)[:10]}")
        _table(fit(records, n_runs, f"v_over_t@{n}"), n)
    _table(fit(records, n_runs), a.policy or "suites/behaviour_tolerance.toml")
    sys.exit(1 if failed else 0)


def _table(table: list[dict], name: str) -> None:
    print(f"\nv/t under {name}:")
    print(f"{'dtype':9} {'metric':22} {'subject':13} {'n':>5} {'zeros':>5} {'worst v/t':>10} {'median':>8} "
          f"{'p(cross)':>9} {'per run':>8}")
    for r in table:
        print(f"{r['dtype']:9} {r['metric']:22} {r['subject'][:13]:13} {r['n']:5d} {r['zeros']:5d} {r['worst']:10.3g} "
              f"{r['median']:8.3g} {r['p_cross']:9.2g} {r['per_run']:8.2g}")
    print(f"implied false alarms per clean run under {name} (fitted chances summed over one run's values): "
          f"{sum(r['per_run'] for r in table):.2g}")


if __name__ == "__main__":
    main()

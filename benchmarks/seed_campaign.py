"""Hundreds of clean seeds of the logits suite's short cells, in one process: does a correct
transformers ever fail the gate?

    python benchmarks/seed_campaign.py --seeds 1-300                       # embedded model, default cells
    python benchmarks/seed_campaign.py --models tiny-gqa,tiny-llama2 --seeds 1-50 --dtypes bfloat16

What `llama-parity logits --seed N` measures on the random (1x16, 2x64) and cached inputs (the
short cells the extremes rule and cache_gap judge; --inputs random,padded,cached adds the padded
one; tp 1, eager and sdpa, every dtype), made and judged by the suite's own code (seeded_inputs,
position_stats, own_gap, Measure.judged with the pooled reference extremes, the paired ratio and
the cache gap), subjects built as the suite builds them, but every one loaded once, not once per seed: what a CLI run per seed (benchmarks/false_alarms.py)
would give, about 20x faster. Every run is clean, so every failing cell is a false alarm. Prints
the failing (seed, cell, metric) under the judging of today and under the judging before the
pooled extremes and the paired ratio ("one draw": each extreme against the reference's own cell
only), and per (dtype, metric) the largest value / limit (above 1 it fails).
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

from false_alarms import models, seeds  # noqa: E402


def campaign(model: Path, name: str, seed_list: list[int], dtypes: list[str], attns: list[str], kinds: list[str],
             shapes: str | None, policy: str | None, tmp: Path, csv: Path | None = None,
             positions: Path | None = None) -> list[dict]:
    from harness.core.metrics import CACHE_GAP, PAIRED, position_stats
    from harness.core.subjects import ReferenceSubject
    from harness.core.suite import Context
    from harness.core.datafiles import suite_data
    from harness.suites.logits import (Logits, Measure, Plan, config_pad_id, oracle_logits, own_gap,
                                       reference_logits, reference_pools, seeded_inputs, subject_logits)
    p = argparse.ArgumentParser()
    Logits().add_arguments(p)
    argv = ["--model", str(model), "--dtypes", ",".join(dtypes), "--attn", ",".join(attns), "--tp", "1",
            "--inputs", ",".join(kinds), "--no-localise", *(["--shapes", shapes] if shapes else []),
            *(["--policy", policy] if policy else [])]
    plan = Plan.from_args(p.parse_args(argv), Context(tmp / "out", progress=False))
    measure = Measure(plan, Context(tmp / "out", progress=False))
    data, pad = suite_data("logits"), config_pad_id(plan.folder, plan.ckpt.args.vocab_size)
    shape_list = sorted({i.shape for i in plan.inputs if i.kind == "random"}, key=lambda s: s.batch * s.seq)
    records = []
    subjects = {}
    try:
        for dtype in dtypes:      # every subject loaded once; the seeds outermost, so a cut-short campaign counts
            cells = {c.attn: c for c in measure.cells()}     # built as the suite builds them
            built = {a: measure.build(cells[a], dtype) for a in attns}
            subjects[dtype] = (ReferenceSubject(plan.ckpt, dtype, plan.device),
                               {a: sub for a, (sub, why) in built.items() if sub is not None})
            for a, (sub, why) in built.items():
                if sub is None:
                    print(f"{name} {dtype} {a}: not measured: {why[1]}", flush=True)
        for seed in seed_list:
            ins = seeded_inputs(data, kinds, shape_list, plan.ckpt.args.vocab_size, seed, pad)
            truth = {i.key(): oracle_logits(measure.oracle(), i) for i in ins}
            mine, arrays = [], {}
            for dtype, (reference, tfs) in subjects.items():
                ref, ref_gap = {}, {}
                for i in ins:
                    logits = reference_logits(reference, i)
                    ref[i.key()] = position_stats(logits, truth[i.key()], mask=i.mask)
                    if i.kind == "cached":      # the reference's cache against its own full forward
                        ref_gap[i.key()] = own_gap(logits, reference.logits(i.ids), i)
                pools = reference_pools(ref, ins)
                for attn, subject in tfs.items():
                    for inp in ins:
                        logits = subject_logits(subject, inp)
                        st = position_stats(logits, truth[inp.key()], mask=inp.mask)
                        case = measure.case(dtype, attn, 1, inp)
                        if positions is not None:     # per-position KL and |dlogit|: rules tried offline
                            key, r = f"{dtype}|{attn}|{inp.name}|{inp.shape}", ref[inp.key()]
                            arrays.update({f"{key}|s_kl": st.kl.numpy(), f"{key}|r_kl": r.kl.numpy(),
                                           f"{key}|s_max_abs": st.max_abs.numpy(),
                                           f"{key}|r_max_abs": r.max_abs.numpy()})
                        gap = ((own_gap(logits, subject.forward(inp.ids), inp), ref_gap[inp.key()])
                               if inp.kind == "cached" else None)
                        now = measure.judged(case, "transformers", st, ref[inp.key()], dtype, truth[inp.key()], inp,
                                             pool=pools.get(inp.kind), gap=gap)
                        before = measure.judged(case, "transformers", st, ref[inp.key()], dtype, truth[inp.key()],
                                                inp)
                        old = {r.metric: r for r in before}
                        for r in now:
                            if r.status not in ("pass", "fail"):
                                continue
                            o = old.get(r.metric)
                            mine.append({
                                "model": name, "seed": seed, "dtype": dtype, "attn": attn, "input": inp.name,
                                "shape": str(inp.shape), "metric": r.metric, "value": r.value, "tolerance": r.tolerance,
                                "v_over_t": r.value / r.tolerance if r.tolerance else math.nan,
                                "fail": r.status == "fail", "reason": r.reason,
                                # before: no paired ratio, each extreme against the cell's own reference draw
                                "fail_one_draw": (r.metric not in PAIRED and r.metric not in CACHE_GAP
                                                  and o is not None and o.status == "fail"),
                                "v_over_t_one_draw": (o.value / o.tolerance if o is not None and o.tolerance
                                                      else math.nan)})
            records += mine
            if positions is not None:
                import numpy as np
                positions.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(positions / f"{name}-{seed}.npz", **arrays)
            if csv is not None:
                pd.DataFrame(mine).to_csv(csv, mode="a", header=not csv.exists(), index=False)
            bad = [f"{r['dtype']} {r['attn']} {r['shape']} {r['metric']}" for r in mine if r["fail"]]
            was = [f"{r['dtype']} {r['attn']} {r['shape']} {r['metric']}" for r in mine if r["fail_one_draw"]]
            print(f"{name} seed {seed}: {len(bad)} failing {bad[:3]}; one-draw judging: {len(was)} {was[:3]}",
                  flush=True)
    finally:
        for _, tfs in subjects.values():
            for sub in tfs.values():
                sub.close()
        if measure._hf is not None:
            measure._hf.close()
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-llama2", help="tiny-llama2 is the embedded model; presets by name")
    p.add_argument("--seeds", default="1-300")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--attn", default="eager,sdpa")
    p.add_argument("--inputs", default="random,cached",
                   help="the short cells the extremes rule and cache_gap judge (padded: add it)")
    p.add_argument("--shapes", help="random-id shapes (default: the suite's, 1x16,2x64)")
    p.add_argument("--policy")
    p.add_argument("--out", default="reports/latest/seed-campaign")
    p.add_argument("--positions", type=Path,
                   help="also write each (model, seed)'s per-position KL and |dlogit| of every cell, subject and "
                        "reference, as DIR/MODEL-SEED.npz (to try a judging rule offline)")
    p.add_argument("--report", action="store_true",
                   help="summarise --out's CSV as it stands, run nothing (--out D1,D2,...: campaigns run side by "
                        "side over other seed ranges, taken together)")
    a = p.parse_args()
    if a.report:
        csvs = [Path(d) / "seed_campaign.csv" for d in a.out.split(",")]
        report(pd.concat([pd.read_csv(c) for c in csvs]), f"{', '.join(map(str, csvs))} (as written so far)")
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "seed_campaign.csv"         # appended seed by seed: --report reads a cut-short one
    csv.unlink(missing_ok=True)
    started, records = time.time(), []
    seed_list = seeds(a.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models(a.models.split(","), Path(tmp)).items():
            records += campaign(model, name, seed_list, a.dtypes.split(","), a.attn.split(","),
                                a.inputs.split(","), a.shapes, a.policy, Path(tmp), csv, a.positions)
    report(pd.DataFrame(records), f"{len(seed_list)} seeds x {a.models}: {time.time() - started:.0f} s")


def report(df: pd.DataFrame, what: str) -> None:
    runs = df.groupby(["model", "seed"])
    for col, judging in (("fail", "today's judging"), ("fail_one_draw", "one-draw extremes, no paired ratio")):
        failed = runs[col].any()
        print(f"\n{judging}: {int(failed.sum())} of {len(failed)} clean (model, seed) runs fail; "
              f"{int(df.groupby(['model', 'seed', 'dtype', 'attn', 'input', 'shape'])[col].any().sum())} cells")
        for _, r in df[df[col]].head(12).iterrows():
            print(f"  {r['model']} seed {r['seed']} {r['dtype']} {r['attn']} {r['input']} {r['shape']} {r['metric']} "
                  f"{r['value']:.3g} (v/t {r['v_over_t' if col == 'fail' else 'v_over_t_one_draw']:.3g})")
    worst = df.groupby(["dtype", "metric"]).agg(n=("v_over_t", "size"), median=("v_over_t", "median"),
                                                worst=("v_over_t", "max"), worst_one_draw=("v_over_t_one_draw", "max"))
    worst["p_cross_tail"] = df.groupby(["dtype", "metric"])["v_over_t"].apply(tail_chance)
    n_runs = len(runs)
    per_run = float((worst["p_cross_tail"].fillna(0) * worst["n"]).sum() / max(n_runs, 1))
    with pd.option_context("display.width", 200, "display.max_rows", 100, "display.float_format", "{:.3g}".format):
        print("\nvalue / limit of every gated transformers value (1 = the limit):")
        print(worst)
    print(f"\nimplied false alarms per run (Pareto tail fitted to each metric's upper v/t, Hill estimator, "
          f"summed over one run's values): {per_run:.2g}")
    print(f"\n{what}")
    sys.exit(1 if df["fail"].any() else 0)


def tail_chance(v: pd.Series) -> float:
    """The chance that one value crosses 1, from a Pareto tail fitted to the upper tenth of the
    values (Hill's estimator): extremes of KL scatter like ratios of chi-square draws, whose tails
    are polynomial, so a normal fit of log v/t would understate them. NaN below 50 values."""
    x = v.dropna().to_numpy()
    x = x[x > 0]
    if len(x) < 50:
        return math.nan
    x.sort()
    k = max(10, len(x) // 10)
    top, edge = x[-k:], x[-k - 1]
    if edge >= 1:
        return float((x > 1).mean())
    alpha = 1.0 / float(sum(math.log(t / edge) for t in top) / k)
    return k / len(x) * edge ** alpha


if __name__ == "__main__":
    main()

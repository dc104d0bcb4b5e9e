"""Print the evidence behind suites/tolerance.toml: for each dtype and metric, how far a correct
transformers is from the float64 oracle relative to the reference at the same dtype (clean runs),
and how far each planted bug is (fault runs). A good policy sits between the two.

    python benchmarks/calibrate_policy.py [--presets tiny-mha,tiny-gqa,default] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import pandas as pd

from harness.core.cases import parse_shapes
from harness.core.faults import FAULTS, get_fault
from harness.core.presets import write_preset
from harness.suites.logits import LogitsRun, run_logits
from harness.core.tolerance import load_policy


def ratios(summary: dict) -> list[dict]:
    cells = summary["cells"]
    ref = {(c["case"]["dtype"], c["case"]["shape"], c["metric"]): c["value"] for c in cells
           if c["subject"] == "reference"}
    out = []
    for c in cells:
        if c["subject"] != "transformers" or c["against"] != "oracle-fp64" or c["value"] is None:
            continue
        r = ref[(c["case"]["dtype"], c["case"]["shape"], c["metric"])]
        v = float(c["value"]) if not isinstance(c["value"], str) else math.nan
        out.append({"dtype": c["case"]["dtype"], "metric": c["metric"], "value": v, "reference": r,
                    "ratio": v / r if r else (math.inf if v else 1.0)})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="tiny-mha,tiny-gqa,tiny-ffnmult,default")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--shapes", default="1x16,2x64")
    p.add_argument("--faults", default=",".join(FAULTS))
    a = p.parse_args()
    draft = Path(tempfile.mkdtemp()) / "draft.toml"
    lines = ['version = "calibration"']
    for d in a.dtypes.split(","):
        lines.append(f"[{d}]\nfactor = 1.0")
        for m in ("max_abs", "rel_l2", "nmse", "kl_mean", "kl_p99", "kl_max", "top1_disagree", "topk_miss",
                  "logprob_diff_max"):
            lines.append(f'[{d}.{m}]\nabs = 1e300\nfloor = 0.0\nreason = "calibration"')
    draft.write_text("\n".join(lines) + "\n")
    policy = load_policy(draft)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets.split(","):
            model = write_preset(preset, Path(tmp) / preset)
            for fault in [None, *a.faults.split(",")]:
                if fault == "gqa-tile" and preset == "tiny-mha":
                    continue
                run = LogitsRun(model=model, dtypes=a.dtypes.split(","), attns=["eager", "sdpa"], tps=[1],
                                shapes=parse_shapes(a.shapes.split(",")), policy=policy,
                                fault=get_fault(fault), out=Path(tmp) / "out", progress=False)
                run_logits(run)
                summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
                for r in ratios(summary):
                    rows.append({"preset": preset, "fault": fault or "(clean)", **r})
    df = pd.DataFrame(rows)
    clean = df[df.fault == "(clean)"].groupby(["dtype", "metric"]).agg(
        worst_clean_ratio=("ratio", "max"), worst_clean_value=("value", "max"))
    faults = df[df.fault != "(clean)"].groupby(["dtype", "metric", "fault"])["ratio"].min().unstack("fault")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3g}".format):
        print("Clean runs: transformers error / reference error vs the float64 oracle (worst cell)")
        print(clean)
        print("\nPlanted faults: the same ratio (least visible cell across presets)")
        print(faults)


if __name__ == "__main__":
    main()

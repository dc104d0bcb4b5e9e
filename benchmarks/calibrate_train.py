"""The evidence behind suites/train_tolerance.toml: how close a correct transformers' training loss and
gradients come to their limits over clean runs, the false-alarm rate that implies, and how far each
planted training bug lands beyond them.

    python benchmarks/calibrate_train.py                                   # small: 2 presets x seeds 1-2
    python benchmarks/calibrate_train.py --models tiny-mha,tiny-gqa,tiny-ffnmult,tiny-outliers \
        --seeds 1-6 --dtypes float32,bfloat16,float16 --write               # the campaign behind the policy

Clean runs (no plant; seeds pick other random ids or text windows) give v / t for every gated
transformers value (above 1 the cell fails). Per (dtype, metric) a normal fit of log(v / t) gives the
chance that one value crosses 1; summed over the values of one run, the false-alarm rate a run
implies. Planted runs give each fault's largest v / t (how far beyond its limit it lands). --write
puts the printed block between the calibration markers of suites/train_tolerance.toml.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cli import main as cli  # noqa: E402
from harness.core.faults import faults_for  # noqa: E402
from harness.core.presets import cached  # noqa: E402

POLICY = ROOT / "suites" / "train_tolerance.toml"
MARK_BEGIN, MARK_END = "# --- calibration", "# --- end of calibration"
# The planted bugs' cells (the smallest matrix each shows in; the default run holds them all)
PLANTS = {
    "labels-shifted-twice": ["--dtypes", "float32", "--inputs", "corpus"],
    "pads-in-labels": ["--dtypes", "float32", "--inputs", "right"],
    "gc-drops-grad": ["--dtypes", "float32", "--checkpointing", "off,reentrant", "--inputs", "corpus"],
    "rope-bf16-autocast": ["--dtypes", "bfloat16", "--casts", "autocast", "--inputs", "long"],
    "ce-no-upcast": ["--dtypes", "bfloat16", "--casts", "load", "--inputs", "corpus"],
    "grad-accum-mean": ["--dtypes", "float32", "--inputs", "right,accum"],
    "lora-scaling": ["--dtypes", "float32", "--inputs", "corpus,lora"],
}


def seeds(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def run(model: Path, out: Path, args: list[str]) -> tuple[int, dict | None]:
    code = cli(["train", "--model", str(model), "--out", str(out), "--no-resume", *args])
    path = out / "summary.json"
    return code, (json.loads(path.read_text()) if path.exists() else None)


def ratios(summary: dict) -> list[tuple[str, str, float]]:
    """(dtype, metric, v/t) of every gated transformers or Trainer value with a non-zero limit."""
    out = []
    for c in summary["cells"]:
        if c["subject"] == "reference" or c["status"] not in ("pass", "fail"):
            continue
        v, t = c["value"], c["tolerance"]
        if isinstance(v, (int, float)) and isinstance(t, (int, float)) and t > 0:
            out.append((c["case"]["dtype"], c["metric"], v / t if math.isfinite(v) else math.inf))
    return out


def fit(values: list[float]) -> tuple[float, float]:
    """(worst, P(v/t > 1)) under a normal fit of log v/t; values of exactly 0 are below any limit."""
    x = [math.log(v) for v in values if v > 0]
    if len(x) < 5:
        return max(values, default=0.0), float("nan")
    mu = sum(x) / len(x)
    sd = max((sum((a - mu) ** 2 for a in x) / (len(x) - 1)) ** 0.5, 1e-9)
    return max(values), 0.5 * math.erfc(-mu / sd / math.sqrt(2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mha,tiny-gqa")
    p.add_argument("--seeds", default="1-2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ctx", default="32")
    p.add_argument("--long-ctx", default="320")
    p.add_argument("--no-plants", action="store_true")
    p.add_argument("--write", action="store_true")
    p.add_argument("--keep", help="keep every run's folder under this directory (default: a temporary one)")
    a = p.parse_args()
    shape = ["--ctx", a.ctx, "--long-ctx", a.long_ctx, "--attn", "eager,sdpa", "--tp", "1"]
    started = time.perf_counter()
    by: dict[tuple[str, str], list[float]] = {}
    runs = failed = 0
    with tempfile.TemporaryDirectory(prefix="calibrate-train-") as tmp:
        tmp = a.keep or tmp
        for name in a.models.split(","):
            model = cached(name)
            for seed in seeds(a.seeds):
                runs += 1
                code, s = run(model, Path(tmp) / f"{name}-{seed}", [*shape, "--dtypes", a.dtypes, "--seed", str(seed)])
                if code != 0:
                    failed += 1
                    bad = [(c["case"], c["metric"], c["reason"]) for c in (s or {}).get("cells", [])
                           if c["status"] == "fail"][:3]
                    print(f"clean run FAILED: {name} seed {seed} exit {code}: {bad}", flush=True)
                mine = ratios(s or {"cells": []})
                for dtype, metric, r in mine:
                    by.setdefault((dtype, metric), []).append(r)
                worst = max(mine, key=lambda x: x[2], default=("-", "-", float("nan")))
                print(f"  clean {name} seed {seed}: exit {code}, {len(mine)} gated values, largest v/t {worst[2]:.3g} "
                      f"({worst[0]} {worst[1]}) ({time.perf_counter() - started:.0f}s)", flush=True)
        planted = {}
        if not a.no_plants:
            model = cached("tiny-gqa")
            for fault in faults_for("train"):
                code, s = run(model, Path(tmp) / f"plant-{fault}", [*shape, "--attn", "eager", "--plant", fault,
                                                                    *PLANTS.get(fault, [])])
                best = max((r for _, _, r in ratios(s or {"cells": []})), default=float("nan"))
                planted[fault] = (code, best)
                print(f"  planted {fault}: exit {code}, largest v/t {best:.3g}", flush=True)
    lines = [f"#   {runs} clean runs: models {a.models}; seeds {a.seeds}; dtypes {a.dtypes}; eager and sdpa, tp 1, both "
             f"casts, every checkpointing mode; --ctx {a.ctx} --long-ctx {a.long_ctx}.",
             f"#   failed clean runs: {failed}."]
    total = 0.0
    rows = []
    for (dtype, metric), vs in sorted(by.items()):
        worst, pc = fit(vs)
        per_run = (pc if pc == pc else 0.0) * len(vs) / max(runs, 1)
        total += per_run
        rows.append(f"#     {dtype:9} {metric:20} worst v/t {worst:.3g}  p(cross) {pc:.2g}  (n {len(vs)})")
    lines.append(f"#   implied false alarms per run (normal fit of log v/t, summed): {total:.2g}")
    lines += rows
    if planted:
        lines.append("#   planted training bugs (exit code, largest v/t):")
        lines += [f"#     {f:22} exit {c}  v/t {b:.3g}" for f, (c, b) in planted.items()]
    lines.append(f"#   {time.perf_counter() - started:.0f} s wall.")
    print("\n".join(lines))
    if a.write:
        text = POLICY.read_text(encoding="utf-8")
        head, _, rest = text.partition(MARK_BEGIN + "\n")
        _, _, tail = rest.partition(MARK_END)
        POLICY.write_text(head + MARK_BEGIN + "\n" + "\n".join(lines) + "\n" + MARK_END + tail, encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The evidence behind suites/train_tolerance.toml: how close a correct transformers' training loss and
gradients come to their limits over clean runs, the false-alarm rate that implies, and how far each
planted training bug lands beyond them.

    python benchmarks/calibrate_train.py                                   # small: 2 presets x seeds 1-2
    python benchmarks/calibrate_train.py --models tiny-mha,tiny-gqa,tiny-ffnmult,tiny-outliers \
        --seeds 1-6 --dtypes float32,bfloat16,float16 --write               # the campaign behind the policy

    python benchmarks/calibrate_train.py --from DIR                       # analyse kept runs again

Clean runs (no plant; seeds pick other random ids or text windows) give v / t for every gated
transformers value (above 1 the cell fails). Per (dtype, metric) a normal fit of log(v / t) gives the
chance that one value crosses 1; summed over the values of one run, the false-alarm rate a run
implies. Planted runs give each fault's largest v / t (how far beyond its limit it lands);
--plant-dtype runs every plant's cells at one dtype instead of its own (does each bug still show there).

--write touches only the dtypes the runs calibrate (those with a loss_rel_err cell): the printed block
goes between the calibration markers that name exactly those dtypes (`# --- calibration: float16`),
a new block if there is none, and the derived noise_factor into those dtypes' loss_rel_err tables.
Blocks of other dtypes and their numbers stay as they are: a campaign over float16 alone does not
replace the evidence of a bfloat16 one. A block naming some of the dtypes but not all (its campaign
and this one would both claim a dtype) is exit 2; a block whose dtypes all lie among the runs' is
replaced.

The loss is one scalar per cell: where it lands against the oracle's is a draw, so factor x the
reference's own draw is no scale (the reference may land close by luck). Its limit also allows
noise_factor x the reference's noise scale s (metrics.loss_noise: the spread of its per-token errors
over sqrt(count)). Write d = (e_subject - e_reference) / s with e the signed relative loss errors:
if |e_subject| > max(m |e_reference|, k s) (m = max_factor) then |d| > k (m - 1) / m, whatever the
reference drew. So from the campaign's d (fitted as a normal per model, its sd taken at the upper
95% bound)
    k = m / (m - 1) x sd95 x z,   z: P(|N(0, 1)| > z) = TARGET / loss values per run
keeps the loss's false alarms below TARGET per run; the dtype takes its widest model's k. Loss rows are judged again under the policy
as it stands (so a changed noise_factor is seen without rerunning); the other rows keep their limit.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cli import main as cli  # noqa: E402
from harness.core.faults import faults_for  # noqa: E402
from harness.core.presets import EMBEDDED, cached  # noqa: E402
from harness.core.tolerance import load_policy  # noqa: E402
from harness.suites.train.measure import judge  # noqa: E402

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
    "lora-gc-no-input-grad": ["--dtypes", "float32", "--checkpointing", "off,reentrant", "--inputs", "corpus,lora"],
}


DTYPES = ("float32", "bfloat16", "float16")
TARGET = 0.001      # the loss's share of false alarms per run that noise_factor is derived for
LOSS = "loss_rel_err"


def plant_cells(fault: str, dtype: str | None = None) -> list[str]:
    """The flags of a plant's cells; ``dtype``: the same cells at that dtype instead of the plant's own."""
    cells = list(PLANTS.get(fault, []))
    if dtype:
        cells = [dtype if prev == "--dtypes" else x for prev, x in zip(["", *cells], cells)]
        cells += [] if "--dtypes" in cells else ["--dtypes", dtype]
    return cells


def seeds(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def run(model: Path, out: Path, args: list[str]) -> tuple[int, dict | None]:
    code = cli(["train", "--model", str(model), "--out", str(out), "--no-resume", *args])
    path = out / "summary.json"
    return code, (json.loads(path.read_text()) if path.exists() else None)


def _ref_input(case: dict) -> str:
    return "lora" if case["input"].startswith("lora") else case["input"]


def _signed(cells: list[dict], cell: dict) -> float | None:
    """The signed relative loss error of a loss cell, from its own or its grad_rel_l2 row's evidence."""
    for c in cells:
        if c["subject"] == cell["subject"] and c["case"] == cell["case"] and c["metric"] in (LOSS, "grad_rel_l2"):
            ex = c.get("extra") or {}
            if "loss" in ex and ex.get("oracle_loss"):
                return (ex["loss"] - ex["oracle_loss"]) / abs(ex["oracle_loss"])
    return None


def _reference(cells: list[dict], cell: dict, metric: str = LOSS) -> dict | None:
    """The reference row that calibrated ``cell`` (same dtype, cast and input; LoRA rows: the lora one)."""
    want = {k: cell["case"][k] for k in ("dtype", "cast") if k in cell["case"]}
    for c in cells:
        if (c["subject"] == "reference" and c["metric"] == metric and _ref_input(c["case"]) == _ref_input(cell["case"])
                and all(c["case"].get(k) == v for k, v in want.items())):
            return c
    return None


SIGNED = (LOSS, "loss_of_logits_rel_err")     # one scalar's error: fitted signed (see fit)


def ratios(summary: dict, policy, losses: list | None = None) -> list[tuple[str, str, float]]:
    """(dtype, metric, v/t) of every gated value with a non-zero limit, each judged again under
    ``policy`` (the calibrating reference's value, and for the loss its noise scale, from its row).
    Reference rows count too, as 'reference METRIC': they are held to abs and can fail a run.
    The loss's v/t keeps the sign of its error. ``losses`` collects (dtype, d, max_factor) of each
    loss cell whose signed errors are known (noise_factors)."""
    out, cells = [], summary["cells"]
    for c in cells:
        v = c["value"]
        if c["status"] not in ("pass", "fail") or not isinstance(v, (int, float)):
            continue
        dtype, metric, mine = c["case"]["dtype"], c["metric"], c["subject"] == "reference"
        ref = None if mine else _reference(cells, c, metric)
        noise = ((ref.get("extra") or {}).get("loss_noise")) if ref and metric == LOSS else None
        t = judge(policy, dtype, metric, v, ref["value"] if ref else None, noise)[0]
        if metric == LOSS and not mine and ref is not None:
            es, er = _signed(cells, c), _signed(cells, ref)
            if losses is not None and noise and es is not None and er is not None:
                losses.append((dtype, (es - er) / noise, policy.limit(dtype, LOSS).max_factor or 1.0))
        if t > 0:
            r = v / t if math.isfinite(v) else math.inf
            if metric in SIGNED and (_sign(cells, c) or 0.0) < 0:
                r = -r
            out.append((dtype, ("reference " if mine else "") + metric, r))
    return out


def _sign(cells: list[dict], cell: dict) -> float | None:
    if cell["metric"] == LOSS:
        return _signed(cells, cell)
    own = (cell.get("extra") or {}).get("loss_of_logits")
    for c in cells:
        if c["subject"] == cell["subject"] and c["case"] == cell["case"] and c["metric"] == "grad_rel_l2":
            loss = (c.get("extra") or {}).get("loss")
            return None if loss is None or own is None else loss - own
    return None


def within_sd(groups: list[list[float]], signed: bool) -> float:
    """The spread within a model, pooled over models (each group centred on its own mean): the fit of
    a model with few values (the steps rows: one a run) takes its own mean and this spread."""
    dev = dof = 0.0
    for vs in groups:
        x = list(vs) if signed else [math.log(v) for v in vs if v > 0]
        if len(x) >= 2:
            mu = sum(x) / len(x)
            dev += sum((a - mu) ** 2 for a in x)
            dof += len(x) - 1
    return math.sqrt(dev / dof) if dof >= 4 else float("nan")


def p_cross(vs: list[float], signed: bool, sd: float) -> float:
    """P(|v/t| > 1) for a model with its own mean and the spread ``sd`` (see within_sd)."""
    x = list(vs) if signed else [math.log(v) for v in vs if v > 0]
    if not x or sd != sd:
        return float("nan")
    mu, sd = sum(x) / len(x), max(sd, 1e-12)
    if signed:
        return 0.5 * math.erfc((1 - mu) / sd / math.sqrt(2)) + 0.5 * math.erfc((1 + mu) / sd / math.sqrt(2))
    return 0.5 * math.erfc(-mu / sd / math.sqrt(2))


def z_two_sided(p: float) -> float:
    """z with P(|N(0, 1)| > z) = p (bisection on erfc)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erfc(mid / math.sqrt(2)) > p else (lo, mid)
    return hi


def noise_factors(losses: dict[str, list], runs: dict[str, int]) -> tuple[dict[str, float], list[str]]:
    """Per dtype the noise_factor the campaign's d implies (module docstring), and the lines saying so.
    Per model, as the other fits: a run is one model, and d's spread differs by model (the embedded
    model's is wider than the random presets'), so a pool dominated by cheap presets' seeds would size
    the factor below the embedded model's noise. The dtype's factor is its widest model's; a model with
    fewer than 5 values of a dtype is not fitted."""
    out: dict[str, float] = {}
    lines: list[str] = []
    skew: set[str] = set()
    for dtype in sorted({d for vs in losses.values() for d, _, _ in vs}):
        for model in sorted(losses):
            ds = [x for d, x, _ in losses[model] if d == dtype and math.isfinite(x)]
            n = len(ds)
            if n < 5:
                continue
            m = max(mf for d, _, mf in losses[model] if d == dtype)
            mean = sum(ds) / n
            sd = math.sqrt(sum(x * x for x in ds) / n)       # about 0: a shared bias would be the reference's too
            chi = n * (1 - 2 / (9 * n) - 1.645 * math.sqrt(2 / (9 * n))) ** 3    # chi2 5% quantile (Wilson-Hilferty)
            sd95 = sd * math.sqrt(n / chi)
            per_run = n / max(runs.get(model, 1), 1)
            z = z_two_sided(TARGET / per_run)
            k = m / (m - 1) * sd95 * z
            out[dtype] = max(out.get(dtype, 0.0), k)
            p_now = math.erfc(k * (m - 1) / m / sd / math.sqrt(2)) if sd > 0 else 0.0
            lines.append(f"#     {dtype:9} {model:12} d = (e_subject - e_reference) / s: n {n}, mean {mean:+.2f}, rms "
                         f"{sd:.2f} (95% bound {sd95:.2f}), largest |d| {max(abs(x) for x in ds):.2f}; noise_factor "
                         f"{k:.1f} (z {z:.2f}); loss false alarms per run <= {p_now * per_run:.1g}")
            if mean ** 2 > sd ** 2 / 4:
                skew.add(dtype)
        if dtype in skew:
            lines.append(f"#     {dtype:9} (d is not centred: a systematic gap, not rounding noise; its noise_factor "
                         "is not written, the floor and factor x the reference hold that loss)")
            out.pop(dtype, None)
        elif dtype in out:
            lines.append(f"#     {dtype:9} noise_factor {out[dtype]:.1f} (the widest model's)")
    return out, lines


def fit(values: list[float], signed: bool = False) -> tuple[float, float]:
    """(worst, P(v/t > 1)) under a normal fit of log v/t; values of exactly 0 are below any limit.
    ``signed`` (the loss): v/t carries the sign of the error and the fit is a normal of v/t itself,
    P(|v/t| > 1). A loss error is a sum of many tokens' rounding, centred near 0: the log of its absolute
    value has a long tail towards 0 that a normal fit of log v/t turns into a fat tail above 1."""
    if signed:
        if len(values) < 5:
            return max(map(abs, values), default=0.0), float("nan")
        mu = sum(values) / len(values)
        sd = max((sum((a - mu) ** 2 for a in values) / (len(values) - 1)) ** 0.5, 1e-12)
        p = 0.5 * math.erfc((1 - mu) / sd / math.sqrt(2)) + 0.5 * math.erfc((1 + mu) / sd / math.sqrt(2))
        return max(map(abs, values)), p
    x = [math.log(v) for v in values if v > 0]
    if len(x) < 5:
        return max(values, default=0.0), float("nan")
    mu = sum(x) / len(x)
    sd = max((sum((a - mu) ** 2 for a in x) / (len(x) - 1)) ** 0.5, 1e-9)
    return max(values), 0.5 * math.erfc(-mu / sd / math.sqrt(2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mha,tiny-gqa", help="presets, or tiny-llama2 (the embedded model)")
    p.add_argument("--seeds", default="1-2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ctx", default="32")
    p.add_argument("--long-ctx", default="320")
    p.add_argument("--no-plants", action="store_true")
    p.add_argument("--no-clean", action="store_true", help="only the planted runs (into --keep, beside clean ones)")
    p.add_argument("--plant-dtype", choices=DTYPES,
                   help="run every plant's cells at this dtype instead of its own (folders plant-FAULT@DTYPE)")
    p.add_argument("--write", action="store_true")
    p.add_argument("--keep", help="keep every run's folder under this directory (default: a temporary one)")
    p.add_argument("--from", dest="source", help="no runs: analyse the runs kept in this directory (--keep)")
    p.add_argument("--policy", type=Path, default=POLICY, help="judge the loss cells under this policy (--from)")
    a = p.parse_args()
    if a.source:
        return analyse(Path(a.source), a.write, policy_path=a.policy)
    shape = ["--ctx", a.ctx, "--long-ctx", a.long_ctx, "--attn", "eager,sdpa", "--tp", "1"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calibrate-train-") as tmp:
        tmp = Path(a.keep or tmp)
        for seed in [] if a.no_clean else seeds(a.seeds):          # seed-major: a campaign cut short still covers every model
            for name in a.models.split(","):
                if a.keep and (tmp / f"{name}-{seed}" / "summary.json").exists():
                    continue                  # kept from an earlier, cut-short campaign
                model = EMBEDDED if name == "tiny-llama2" else cached(name)
                code, s = run(model, tmp / f"{name}-{seed}", [*shape, "--dtypes", a.dtypes, "--seed", str(seed)])
                mine = ratios(s or {"cells": []}, load_policy(POLICY))
                worst = max(mine, key=lambda x: abs(x[2]), default=("-", "-", float("nan")))
                print(f"  clean {name} seed {seed}: exit {code}, {len(mine)} gated values, largest v/t {worst[2]:.3g} "
                      f"({worst[0]} {worst[1]}) ({time.perf_counter() - started:.0f}s)", flush=True)
        if not a.no_plants:
            model = cached("tiny-gqa")
            for fault in faults_for("train"):
                cells, name = plant_cells(fault, a.plant_dtype), f"plant-{fault}"
                name += f"@{a.plant_dtype}" if a.plant_dtype else ""
                code, s = run(model, tmp / name, [*shape, "--attn", "eager", "--plant", fault, *cells])
                print(f"  planted {fault}{'@' + a.plant_dtype if a.plant_dtype else ''}: exit {code}", flush=True)
        return analyse(tmp, a.write, f"models {a.models}; seeds {a.seeds}; dtypes {a.dtypes}; eager and sdpa, tp 1, "
                                     f"both casts, every checkpointing mode; --ctx {a.ctx} --long-ctx {a.long_ctx}")


def analyse(folder: Path, write: bool, what: str = "", policy_path: Path = POLICY) -> int:
    """The campaign's figures from the run folders in ``folder``: clean runs (MODEL-SEED) and planted
    ones (plant-FAULT), every cell judged again under the policy as it stands.

    The fits are per model: a run is one model, and across models different terms of the rule bind
    (the floor on a random preset, factor x the reference on the trained one), so a pooled sample is
    bimodal and its fit a fat tail that no model has. A (model, dtype, metric) with fewer than 5
    values (the steps rows: one a run) borrows the fit pooled over models. The implied false alarms
    per run: per model, the sum over its metrics of P(cross) x values per run; the headline is the
    worst model."""
    policy = load_policy(policy_path)
    by: dict[tuple[str, str, str], list[float]] = {}
    losses: dict[str, list] = {}
    runs: dict[str, int] = {}
    failed = 0
    planted = {}
    calibrated: set[str] = set()
    for path in sorted(folder.glob("*/summary.json")):
        s = json.loads(path.read_text())
        name = path.parent.name
        if name.startswith("plant-"):
            mine = ratios(s, policy)
            caught = [x for x in mine if abs(x[2]) > 1 and not x[1].startswith("reference")]
            best = max(caught or mine, key=lambda x: abs(x[2]), default=("-", "-", float("nan")))
            planted[name[len("plant-"):]] = (len(caught), best)
            continue
        model = name.rsplit("-", 1)[0]
        runs[model] = runs.get(model, 0) + 1
        calibrated |= {c["case"]["dtype"] for c in s["cells"] if c["metric"] == LOSS and c["subject"] != "reference"}
        mine = ratios(s, policy, losses.setdefault(model, []))
        bad = [(d, m, r) for d, m, r in mine if abs(r) > 1]
        if bad:
            failed += 1
            print(f"clean run FAILED under the policy: {name}: {bad[:3]}", flush=True)
        for dtype, metric, r in mine:
            by.setdefault((model, dtype, metric), []).append(r)
    total_runs = sum(runs.values())
    factors, loss_lines = noise_factors(losses, runs)
    groups: dict[tuple[str, str], list[list[float]]] = {}
    for (model, dtype, metric), vs in by.items():
        groups.setdefault((dtype, metric), []).append(vs)
    unfitted = set()
    rate = {m: 0.0 for m in runs}
    worst_of: dict[tuple[str, str], tuple[float, float, str]] = {}
    for (model, dtype, metric), vs in sorted(by.items()):
        signed = metric.split()[-1] in SIGNED
        worst, pc = fit(vs, signed)
        if pc != pc:
            pc = p_cross(vs, signed, within_sd(groups[(dtype, metric)], signed))
        if pc != pc:
            unfitted.add(f"{dtype} {metric}")
        else:
            rate[model] += pc * len(vs) / runs[model]
        w = worst_of.get((dtype, metric), (0.0, 0.0, ""))
        worst_of[(dtype, metric)] = (max(w[0], worst), w[1] if pc != pc else max(w[1], pc),
                                     model if worst >= w[0] else w[2])
    lines = [f"#   {total_runs} clean runs ({', '.join(f'{m} {n}' for m, n in runs.items())})"
             f"{': ' + what if what else ''}.",
             f"#   failed clean runs (judged under this policy): {failed}.",
             f"#   implied false alarms per run (per model: normal fit of log v/t, of v/t for the loss, summed): "
             + ", ".join(f"{m} {r:.2g}" for m, r in rate.items()) + f"; worst {max(rate.values(), default=0):.2g}",
             *([f"#   not fitted (too few values): {', '.join(sorted(unfitted))}"] if unfitted else []),
             "#   per dtype and metric: worst v/t (model), largest p(cross) per value over models:"]
    lines += [f"#     {d:9} {m:33} {w:.3g} ({mod})  " + (f"p {p:.2g}" if f"{d} {m}" not in unfitted else "not fitted")
              for (d, m), (w, p, mod) in sorted(worst_of.items())]
    lines.append(f"#   the loss's noise scale (target {TARGET} loss false alarms per run):")
    lines += loss_lines
    if planted:
        lines.append("#   planted training bugs (cells failing, largest v/t and where):")
        lines += [f"#     {f:22} {n} failing  v/t {abs(b[2]):.3g} ({b[0]} {b[1]})" for f, (n, b) in planted.items()]
    print("\n".join(lines))
    if write:
        if not calibrated:
            print(f"calibrate_train.py: --write: no clean run in {folder} to calibrate a dtype with", file=sys.stderr)
            return 2
        try:
            text = rewrite(POLICY.read_text(encoding="utf-8"), calibrated, lines, factors)
        except ValueError as e:
            print(f"calibrate_train.py: --write: {POLICY}: {e}", file=sys.stderr)
            return 2
        POLICY.write_text(text, encoding="utf-8")
    return 1 if failed else 0


BLOCK = re.compile(rf"^{re.escape(MARK_BEGIN)}(?::[ ]*(?P<dtypes>[^\n]*))?\n(?P<body>.*?)^{re.escape(MARK_END)}[^\n]*$",
                   re.M | re.S)


def rewrite(text: str, dtypes: set[str], lines: list[str], factors: dict[str, float]) -> str:
    """``text`` (the policy) with the calibration block of exactly ``dtypes`` set to ``lines`` and
    those dtypes' loss noise_factor to ``factors``; every other dtype's block and numbers untouched.
    A block with no dtypes in its marker covers the two the policy's first campaign ran. ValueError:
    a block that shares some dtypes with ``dtypes`` but holds others (both would claim a dtype)."""
    key = ", ".join(sorted(dtypes))
    block = f"{MARK_BEGIN}: {key}\n" + "\n".join(lines) + f"\n{MARK_END}: {key}"
    spans = []
    for m in BLOCK.finditer(text):
        theirs = {d.strip() for d in (m.group("dtypes") or "bfloat16, float32").split(",") if d.strip()}
        if theirs <= dtypes:
            spans.append(m.span())
        elif theirs & dtypes:
            raise ValueError(f"the calibration block of {', '.join(sorted(theirs))} also covers "
                             f"{', '.join(sorted(theirs & dtypes))}: calibrate {', '.join(sorted(theirs | dtypes))} "
                             "together, or move that block's figures by hand")
    if spans:
        # the first replaced block's place takes the new one; the others (superseded) go
        for lo, hi in reversed(spans[1:]):
            text = text[:lo].rstrip("\n") + "\n" + text[hi:].lstrip("\n")
        lo, hi = spans[0]
        text = text[:lo] + block + text[hi:]
    else:
        last = list(BLOCK.finditer(text))
        at = last[-1].end() if last else text.index("\nversion =")
        text = text[:at] + "\n" + block + text[at:]
    for dtype, k in factors.items():
        if dtype in dtypes:
            text = re.sub(rf"(\[{dtype}\.{LOSS}\][^\[]*?noise_factor = )[0-9.e+-]+", rf"\g<1>{k:.1f}", text)
    return text


if __name__ == "__main__":
    sys.exit(main())

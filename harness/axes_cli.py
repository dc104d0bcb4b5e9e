"""`llama-parity axes --suite cast,flags`: cast paths with long positions, and output flags.
Results in the common schema, one folder per suite under --out; exit 0 when every gated cell
passes, 1 when one fails, 2 on bad input (checked before anything is written)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_axes(run, suites: list[str]) -> int:
    from reference_model import checkpoint

    from harness.results import markdown as report
    from harness.suites.axes import run_cast, run_flags
    from harness.core.environment import environment
    from harness.suites.logits import check_device
    from harness.core.store import exit_code, write_results
    from harness.core.subjects import HFFolder

    check_device(run.device)
    ckpt = checkpoint.load(run.model)
    if run.fault is not None and run.fault.min_positions > max(run.lengths) and "cast" in suites:
        run.log.append(f"note: --plant {run.fault.name} shows from about {run.fault.min_positions} positions; "
                       f"the longest length here is {max(run.lengths)}")
    hf = HFFolder(ckpt)
    codes = []
    try:
        for name in suites:
            rows = {"cast": run_cast, "flags": run_flags}[name](run, ckpt, hf.path)
            extra = {"model": {"path": str(run.model), "format": ckpt.source,
                               "max_position_embeddings": ckpt.args.max_seq_len},
                     "seed": run.seed, "plant": run.fault.name if run.fault else None, "strict": run.strict,
                     "spec": {"path": str(run.spec.path), "version": run.spec.version},
                     "policy": {"path": str(run.policy.path), "version": run.policy.version},
                     "behaviour_policy": {"path": str(run.behaviour_policy.path),
                                          "version": run.behaviour_policy.version}}
            if name == "cast":
                extra["lengths"] = run.lengths
            summary = write_results(run.out / name, name, rows, environment(run.device), extra)
            report.write_markdown(run.out / name / "report.md", summary)
            report.print_console(summary)
            codes.append(exit_code(rows))
    finally:
        hf.close()
    return max(codes, default=0)


def cmd_axes(a: argparse.Namespace) -> int:
    from harness.suites.axes import CASTS, FLAGS, SUITES, AxesRun, load_spec, parse_lengths
    from harness.suites.behaviour.common import DEFAULT_POLICY as BEHAVIOUR_POLICY
    from harness.core.cases import KNOWN_ATTN, KNOWN_DTYPES, check_choices
    from harness.core.errors import InputError
    from harness.core.faults import get_fault
    from harness.core.presets import long_positions_model
    from harness.core.tolerance import load_policy

    spec = load_spec(a.spec)
    d = spec.defaults
    suites = check_choices("--suite", a.suite or list(SUITES), SUITES)
    if a.model and not Path(a.model).exists():
        raise InputError(f"--model: {a.model}: no such file or folder")
    run = AxesRun(
        model=Path(a.model) if a.model else long_positions_model(),
        dtypes=check_choices("--dtypes", a.dtypes or d.get("dtypes", list(KNOWN_DTYPES)), KNOWN_DTYPES),
        attns=check_choices("--attn", a.attn or d.get("attns", ["eager", "sdpa"]), KNOWN_ATTN),
        casts=check_choices("--casts", a.casts or d.get("casts", list(CASTS)), tuple(CASTS)),
        flags=check_choices("--flags", a.flags or d.get("flags", list(FLAGS)), FLAGS),
        lengths=parse_lengths(a.lengths or [str(n) for n in d.get("lengths", [16])]),
        spec=spec, policy=load_policy(a.policy), behaviour_policy=load_policy(BEHAVIOUR_POLICY),
        device=a.device, seed=a.seed, fault=get_fault(a.plant), strict=a.strict, out=Path(a.out))
    code = run_axes(run, suites)
    for line in run.log:
        print(line, file=sys.stderr)
    print(f"results: {run.out}/<suite>/results.csv, summary.json, report.md")
    return code


def register(sub) -> None:
    from harness.cli import _csv
    p = sub.add_parser("axes", help="cast paths (load/to/autocast) with long positions, and output flags")
    p.add_argument("--suite", type=_csv, help="comma list of cast,flags (default: both)")
    p.add_argument("--model", help="Meta or HF checkpoint; default: the long-hd128 preset (head_dim 128, "
                                   "max_position_embeddings 2048), generated into the cache")
    p.add_argument("--dtypes", type=_csv, help="comma list of float32,bfloat16,float16")
    p.add_argument("--attn", type=_csv, help="comma list of attention implementations")
    p.add_argument("--casts", type=_csv, help="comma list of load,to,autocast")
    p.add_argument("--flags", type=_csv, help="comma list of none,attentions,hidden_states")
    p.add_argument("--lengths", type=_csv, help="comma list of sequence lengths for the cast suite")
    p.add_argument("--spec", help="axes data file (default: suites/axes.toml)")
    p.add_argument("--policy", help="logits tolerance policy (default: suites/tolerance.toml)")
    p.add_argument("--plant", help="plant a known porting bug in the transformers subject")
    p.add_argument("--strict", action="store_true", help="gate known deviations like any other row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/latest/axes")
    p.set_defaults(func=cmd_axes)

"""`llama-parity behaviour --suite generate|cache|padding|seqcls|hidden|all`: the suites beyond one
forward pass. Results in the common schema (harness/store.py), one folder per suite under --out;
exit 0 when every cell passes, 1 when one fails, 2 on bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITES = ("generate", "cache", "padding", "seqcls", "hidden")


def _suite_runner(name: str):
    from harness.suites.behaviour import cache as cache_suite; from harness.suites.behaviour import generate as generation; from harness.suites.behaviour import hidden as hidden_states; from harness.suites.behaviour import padding; from harness.suites.behaviour import seqcls
    return {"generate": generation.run, "cache": cache_suite.run, "padding": padding.run,
            "seqcls": seqcls.run, "hidden": hidden_states.run_hidden}[name]


def run_suites(run, suites: list[str]) -> int:
    """Run the suites on one checkpoint, write each one's results, return the exit code."""
    from reference_model import checkpoint

    from harness.results import markdown as report
    from harness.suites.behaviour.common import PLANTS
    from harness.core.environment import environment
    from harness.suites.logits import check_device
    from harness.core.store import exit_code, write_results
    from harness.core.subjects import HFFolder

    check_device(run.device)
    ckpt = checkpoint.load(run.model)
    if run.plant is not None:
        seen = set(PLANTS[run.plant][1]) & set(suites)
        if not seen:
            run.log.append(f"note: --plant {run.plant} is visible only in suite(s) {', '.join(PLANTS[run.plant][1])}")
    hf = HFFolder(ckpt)
    codes = []
    try:
        for name in suites:
            rows = _suite_runner(name)(run, ckpt, hf.path)
            extra = {"model": {"path": str(run.model), "format": ckpt.source},
                     "seed": run.seed, "plant": run.plant,
                     "policy": {"path": str(run.policy.path), "version": run.policy.version}}
            summary = write_results(run.out / name, name, rows, environment(run.device), extra)
            report.write_markdown(run.out / name / "report.md", summary)
            report.print_console(summary)
            codes.append(exit_code(rows))
    finally:
        hf.close()
    return max(codes, default=0)


def cmd_behaviour(a: argparse.Namespace) -> int:
    from harness.suites.behaviour.common import BehaviourRun, DEFAULT_POLICY, check_plant
    from harness.core.cases import KNOWN_ATTN, KNOWN_DTYPES, check_choices
    from harness.core.errors import InputError
    from harness.core.presets import default_model
    from harness.core.tolerance import load_policy

    suites = list(SUITES) if a.suite == ["all"] else check_choices("--suite", a.suite, SUITES)
    if a.model and not Path(a.model).exists():
        raise InputError(f"--model: {a.model}: no such file or folder")
    check_plant(a.plant)
    run = BehaviourRun(
        model=Path(a.model) if a.model else default_model(),
        dtypes=check_choices("--dtypes", a.dtypes or ["float32", "bfloat16", "float16"], KNOWN_DTYPES),
        attns=check_choices("--attn", a.attn or ["eager", "sdpa"], KNOWN_ATTN),
        device=a.device, seed=a.seed, policy=load_policy(a.policy or DEFAULT_POLICY), plant=a.plant,
        out=Path(a.out))
    code = run_suites(run, suites)
    for line in run.log:
        print(line, file=sys.stderr)
    print(f"results: {run.out}/<suite>/results.csv, summary.json, report.md")
    return code


def register(sub) -> None:
    from harness.cli import _csv
    b = sub.add_parser("behaviour", help="generation, KV cache, padding/batching, sequence classification, "
                                         "hidden-state parity")
    b.add_argument("--suite", type=_csv, default=["all"], help=f"comma list of {', '.join(SUITES)} or all")
    b.add_argument("--model", help="Meta or HF folder; default: embedded model")
    b.add_argument("--dtypes", type=_csv, help="comma list of float32,bfloat16,float16 (default: all three)")
    b.add_argument("--attn", type=_csv, help="comma list of eager,sdpa,... (default: eager,sdpa)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--policy", help="tolerance policy TOML (default: suites/behaviour.toml)")
    b.add_argument("--plant", help="plant a bug in the transformers subject (pad-attend, cache-off-by-one, "
                                   "pool-last-position, last-layer-gate-up)")
    b.add_argument("--out", default="reports/latest/behaviour", help="output folder (one subfolder per suite)")
    b.set_defaults(func=cmd_behaviour)

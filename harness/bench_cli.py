"""`llama-parity bench`: lm-eval tasks through the reference and transformers, compared per document."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.core.errors import InputError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_bench(a: argparse.Namespace) -> int:
    from harness.suites.bench.run import lmeval_unsupported
    why = lmeval_unsupported()
    if why:
        raise InputError(f"bench: {why}")
    from harness.suites.bench.paired import load_bench_policy
    from harness.suites.bench.run import DEFAULT_TASKS, FAULTS, BenchRun, run_bench
    from harness.core.subjects import DTYPES
    if a.model and not Path(a.model).exists():
        raise InputError(f"--model: {a.model}: no such file or folder")
    if a.tokenizer and not Path(a.tokenizer).is_file():
        raise InputError(f"--tokenizer: {a.tokenizer}: file not found")
    if a.limit is not None and a.limit < 1:
        raise InputError("--limit: must be >= 1")
    if a.batch_size < 1:
        raise InputError("--batch-size: must be >= 1")
    if a.dtype not in DTYPES or a.dtype == "float64":
        raise InputError(f"--dtype: {a.dtype!r} (float32, bfloat16 or float16)")
    if a.plant and a.plant not in FAULTS:
        raise InputError(f"--plant: unknown fault {a.plant!r} (known: {', '.join(FAULTS)})")
    if a.model:
        model = Path(a.model)
    else:
        from harness.core.presets import default_model
        model = default_model()
    tasks = [t for group in (a.tasks or [list(DEFAULT_TASKS)]) for t in group]
    run = BenchRun(model=model, tasks=tasks, limit=a.limit, out=Path(a.out), dtype=a.dtype,
                   batch_size=a.batch_size, max_length=a.max_length, num_fewshot=a.num_fewshot,
                   effects=a.effects, fault=a.plant, policy=load_bench_policy(a.policy),
                   tokenizer=Path(a.tokenizer) if a.tokenizer else None, device=a.device,
                   subjects=tuple(a.subjects or ("reference", "hf", "adapter-hf")))
    code = run_bench(run)
    for line in run.log:
        print(line, file=sys.stderr)
    print(f"results: {run.out}/results.csv, {run.out}/summary.json, {run.out}/report.md")
    return code


def register(sub) -> None:
    b = sub.add_parser("bench", help="lm-eval benchmark scores, reference vs transformers, paired per document")
    b.add_argument("--model", help="Meta or HF folder; default: the embedded model")
    b.add_argument("--tasks", type=_csv, action="append",
                   help="comma list of lm-eval task names (default: the local suites/lmeval tasks)")
    b.add_argument("--limit", type=int, help="documents per task (default: all)")
    b.add_argument("--out", default="reports/latest/bench", help="output folder")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--max-length", type=int, default=2048)
    b.add_argument("--num-fewshot", type=int, default=0)
    b.add_argument("--effects", action="store_true",
                   help="also measure batch size 1 vs --batch-size and bfloat16 vs float32")
    b.add_argument("--tokenizer", help="tokenizer.model (default: beside the weights, else the built fixture)")
    b.add_argument("--policy", help="benchmark tolerance TOML (default: suites/bench_tolerance.toml)")
    b.add_argument("--plant", help="plant a known fault in the transformers subject (drop-bos)")
    b.add_argument("--subjects", type=_csv,
                   help="comma list from reference,hf,adapter-hf (default: all three)")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_bench)

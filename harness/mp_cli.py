"""`llama-parity mp`: transformers with pretraining_tp = 1 and = k vs Meta's model-parallel logits."""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.core.errors import InputError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_mp(a: argparse.Namespace) -> int:
    from harness.core.cases import parse_shapes, parse_tp
    from harness.core.presets import default_model
    from harness.suites.mp import MPRun, run_mp

    if a.model and not Path(a.model).exists():
        raise InputError(f"--model: {a.model}: no such file or folder")
    try:
        degrees = parse_tp(a.degrees)
    except InputError as e:
        raise InputError(str(e).replace("--tp", "--degrees")) from None
    run = MPRun(model=Path(a.model) if a.model else default_model(), degrees=degrees, dtypes=a.dtypes,
                shapes=parse_shapes(a.shapes), attn=a.attn, ranks=a.ranks, device=a.device, seed=a.seed,
                out=Path(a.out))
    code = run_mp(run)
    print((run.out / "report.md").read_text(), end="")
    print(f"results: {run.out}/results.csv, {run.out}/summary.json, {run.out}/report.md")
    return code


def register(sub) -> None:
    mp = sub.add_parser("mp", help="pretraining_tp vs the original model-parallel logits")
    mp.add_argument("--model", help="Meta or HF folder; default: embedded model")
    mp.add_argument("--degrees", type=_csv, default=["1", "2", "4", "8"], help="model-parallel degrees (1,2,4,8)")
    mp.add_argument("--dtypes", type=_csv, default=["float32", "bfloat16", "float16"])
    mp.add_argument("--shapes", type=_csv, default=["1x64"], help="BATCHxSEQ list (1x64)")
    mp.add_argument("--attn", default="eager", help="transformers attention implementation (eager)")
    mp.add_argument("--ranks", default="emulated", choices=("emulated", "real"),
                    help="original logits from the in-process emulation or real torch.distributed ranks")
    mp.add_argument("--device", default="cpu")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--out", default="reports/latest/mp")
    mp.set_defaults(func=cmd_mp)


def main(argv: list[str] | None = None) -> int:
    """The full `llama-parity` CLI (these commands are registered there): same exit codes."""
    from harness.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

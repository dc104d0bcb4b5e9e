"""`llama-parity`: the command line. Exit codes: 0 every cell passes, 1 a cell fails, 2 bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reference_model.errors import CheckpointError

from harness.core.errors import InputError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _tokenizer_vocab(path: str) -> int:
    """Number of pieces in a SentencePiece tokenizer.model: the vocabulary the checkpoint must have."""
    try:
        from reference_model.tokenizer import TokenizerFileError, read_model_file
    except ImportError:
        raise InputError("--tokenizer: this installation has no tokenizer reader") from None
    if not Path(path).is_file():
        raise InputError(f"--tokenizer {path}: file not found")
    try:
        model = read_model_file(path)
    except TokenizerFileError as e:
        raise InputError(f"--tokenizer {e}") from None
    if not model.pieces:
        raise InputError(f"--tokenizer {path}: no pieces (not a SentencePiece model)")
    return len(model.pieces)


def cmd_logits(a: argparse.Namespace) -> int:
    from harness.core.cases import DEFAULT_ATTN, DEFAULT_DTYPES, DEFAULT_SHAPES, DEFAULT_TP, KNOWN_ATTN, KNOWN_DTYPES
    from harness.core.cases import check_choices, parse_shapes, parse_tp
    from harness.core.faults import get_fault
    from harness.core.presets import default_model
    from harness.suites.logits import LogitsRun, read_tokens, run_logits
    from harness.core.tolerance import load_policy

    if a.tokens and a.shapes:
        raise InputError("--tokens and --shapes: give one (the token file fixes the shape)")
    tokens = read_tokens(a.tokens) if a.tokens else None
    tokenizer_vocab = _tokenizer_vocab(a.tokenizer) if a.tokenizer else None
    run = LogitsRun(
        model=Path(a.model) if a.model else default_model(),
        dtypes=check_choices("--dtypes", a.dtypes or list(DEFAULT_DTYPES), KNOWN_DTYPES),
        attns=check_choices("--attn", a.attn or list(DEFAULT_ATTN), KNOWN_ATTN),
        tps=parse_tp(a.tp or [str(t) for t in DEFAULT_TP]),
        shapes=parse_shapes(a.shapes or list(DEFAULT_SHAPES)),
        device=a.device, seed=a.seed, policy=load_policy(a.policy), fault=get_fault(a.plant),
        out=Path(a.out), progress=not a.no_progress,
        tokens=tokens, tokens_path=Path(a.tokens) if a.tokens else None, resume=not a.no_resume,
        tokenizer_vocab=tokenizer_vocab, localise=not a.no_localise,
    )
    if a.model and not Path(a.model).exists():
        raise InputError(f"--model: {a.model}: no such file or folder")
    code = run_logits(run)
    for line in run.log:
        print(line, file=sys.stderr)
    if a.html:
        from harness.report_cli import render_report
        render_report([run.out], run.out / "report")
    print(f"results: {run.out}/results.csv, {run.out}/summary.json, {run.out}/report.md"
          + (f", {run.out}/report/index.html" if a.html else ""))
    return code


def cmd_make_model(a: argparse.Namespace) -> int:
    from harness.core.presets import write_preset
    if a.shards < 1:
        raise InputError("--shards: must be >= 1")
    path = write_preset(a.preset, Path(a.out), fmt=a.format, shards=a.shards, seed=a.seed)
    print(f"wrote {a.preset} ({a.format}, {a.shards} shard(s), seed {a.seed}) to {path}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from reference_model import checkpoint
    ckpt = checkpoint.load(Path(a.model))
    if a.to == "hf":
        checkpoint.save_hf(Path(a.out), ckpt.args, ckpt.state)
    else:
        checkpoint.save_meta(Path(a.out), ckpt.args, ckpt.state, n_shards=a.shards)
    print(f"converted {a.model} ({ckpt.source}) to {a.to} at {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-parity", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    lg = sub.add_parser("logits", help="reference vs transformers logits over a case matrix")
    lg.add_argument("--model", help="Meta (params.json + consolidated.*.pth) or HF folder; default: embedded model")
    lg.add_argument("--dtypes", type=_csv, help="comma list of float32,bfloat16,float16 (default: all three)")
    lg.add_argument("--attn", type=_csv, help="comma list of eager,sdpa,flash_attention_2,flex_attention")
    lg.add_argument("--tp", type=_csv, help="comma list of pretraining_tp values (default: 1,2)")
    lg.add_argument("--shapes", type=_csv, help="comma list of BATCHxSEQ (default: 1x16,2x64)")
    lg.add_argument("--tokens", help="JSON file: a list of equal-length token-id lists to run instead of --shapes")
    lg.add_argument("--tokenizer", help="SentencePiece tokenizer.model: the checkpoint's vocab_size must match it "
                                        "(fills params.json's -1)")
    lg.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    lg.add_argument("--seed", type=int, default=0)
    lg.add_argument("--policy", help="tolerance policy TOML (default: suites/tolerance.toml)")
    lg.add_argument("--plant", help="plant a known porting bug in the transformers subject (gate self-test)")
    lg.add_argument("--out", default="reports/latest/logits",
                    help="output folder; a rerun with the same folder resumes, skipping finished cells")
    lg.add_argument("--no-progress", action="store_true")
    lg.add_argument("--no-localise", action="store_true",
                    help="skip naming the first diverging layer/op of failing cells")
    lg.add_argument("--html", action="store_true",
                    help="also render the self-contained HTML report and JUnit XML into OUT/report")
    lg.add_argument("--no-resume", action="store_true", help="forget finished cells journaled in --out; rerun all")
    lg.set_defaults(func=cmd_logits)

    mm = sub.add_parser("make-model", help="write a deterministic synthetic checkpoint")
    mm.add_argument("--preset", required=True)
    mm.add_argument("--format", default="meta", choices=("meta", "hf"))
    mm.add_argument("--shards", type=int, default=1, help="model-parallel shards (Meta format)")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--out", required=True)
    mm.set_defaults(func=cmd_make_model)

    cv = sub.add_parser("convert", help="convert a checkpoint between Meta and HF layouts")
    cv.add_argument("--model", required=True)
    cv.add_argument("--to", required=True, choices=("meta", "hf"))
    cv.add_argument("--shards", type=int, default=1)
    cv.add_argument("--out", required=True)
    cv.set_defaults(func=cmd_convert)

    _add_optional_commands(sub)
    return p


def _add_optional_commands(sub) -> None:
    """Suites that live in their own modules register their subcommands here."""
    from harness.axes_cli import register as axes
    from harness.behaviour_cli import register as behaviour
    from harness.bench_cli import register as bench
    from harness.localise_cli import register as localise
    from harness.results.matrix import register as matrix
    from harness.mp_cli import register as mp
    from harness.place_cli import register as place
    from harness.report_cli import register as report
    from harness.tokenizer_cli import register as tokenizer
    for register in (tokenizer, behaviour, axes, bench, mp, matrix, localise, place, report):
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except (InputError, CheckpointError) as e:
        print(f"llama-parity: error: {e}", file=sys.stderr)
        return 2


def main_entry() -> None:
    sys.exit(main())

"""`llama-parity localise` and `llama-parity stream`: where does transformers start to diverge?

localise: full models, one at a time (oracle, reference, transformers), every point captured.
stream:   block by block from the checkpoint's mapped files; peak memory about one block.

Both write results.csv / summary.json (with ``first_divergence``) / report.md in the common
schema, and exit 1 when a point of transformers breaks the rule of ``harness.scale.localise``.
"""
from __future__ import annotations

import argparse
import html
from pathlib import Path

from harness.core.errors import InputError

SUITE_LOCALISE, SUITE_STREAM = "localise", "stream"


def _one_shape(spec: str):
    from harness.core.cases import parse_shapes
    shapes = parse_shapes([spec])
    return shapes[0]


def _check_common(a) -> None:
    from harness.core.cases import KNOWN_ATTN, KNOWN_DTYPES
    if a.dtype not in KNOWN_DTYPES:
        raise InputError(f"--dtype: unknown value {a.dtype!r} (choose from {', '.join(KNOWN_DTYPES)})")
    if a.attn not in KNOWN_ATTN:
        raise InputError(f"--attn: unknown value {a.attn!r} (choose from {', '.join(KNOWN_ATTN)})")
    if a.model and not Path(a.model).exists():
        raise InputError(f"--model: {a.model}: no such file or folder")


def _write(out: Path, suite: str, rows, found: dict, extra: dict, device: str, table: str) -> int:
    from harness.core.environment import environment
    from harness.core.store import atomic_write_text, exit_code, write_results
    summary = write_results(out, suite, rows, environment(device), {"first_divergence": found, **extra})
    where = ("none: every point is within the rule" if found["layer"] is None and found["op"] is None
             else f"layer {found['layer']}, op {found['op']} ({found['point']}; {found['ratio']:.3g}x "
                  f"the reference's error, a {found['jump']:.3g}x jump)")
    text = (f"# {suite}: {summary['verdict'].upper()}\n\n"
            f"First divergence of transformers: **{html.escape(where, quote=False)}**\n\n"
            f"Rule: {html.escape(found['rule'], quote=False)}. Errors are relative L2 against the float64 oracle.\n\n"
            f"Settings: {html.escape(', '.join(f'{k}={v}' for k, v in extra['case'].items()), quote=False)}\n\n"
            f"## Error curve per subject\n\n{table}")
    atomic_write_text(out / "report.md", text)
    print(f"first divergence: {where}")
    print(f"results: {out}/results.csv, {out}/summary.json, {out}/report.md")
    return exit_code(rows)


def cmd_localise(a: argparse.Namespace) -> int:
    from reference_model import checkpoint

    from harness.core.cases import make_inputs
    from harness.core.faults import get_fault
    from harness.scale.localise import capture_full, curve_markdown, curve_rows, locate
    from harness.core.presets import default_model
    from harness.suites.logits import check_device
    from harness.core.subjects import HFFolder, attn_implementations

    _check_common(a)
    check_device(a.device)
    shape = _one_shape(a.shape)
    why = attn_implementations(a.device).get(a.attn, "")
    if why:
        raise InputError(f"--attn {a.attn}: {why}")
    fault = get_fault(a.plant)
    model = Path(a.model) if a.model else default_model()
    ckpt = checkpoint.load(model)
    ids = make_inputs(shape, ckpt.args.vocab_size, a.seed)
    hf = HFFolder(ckpt)
    try:
        order, ref, tf = capture_full(ckpt, hf.path, ids, a.dtype, a.device, a.attn, a.tp, fault, fine=not a.coarse)
    finally:
        hf.close()
    found = locate(order, tf, ref, a.dtype)
    case = {"dtype": a.dtype, "attn": a.attn, "tp": a.tp, "shape": str(shape), "device": a.device}
    curves = {"reference": ref, "transformers": tf}
    rows = curve_rows(SUITE_LOCALISE, case, order, curves, ref, a.dtype)
    extra = {"case": case, "model": str(model), "seed": a.seed, "plant": a.plant,
             "truth": "oracle-fp64 (the reference entirely in float64)"}
    return _write(Path(a.out), SUITE_LOCALISE, rows, found, extra, a.device,
                  curve_markdown(order, curves, ref, a.dtype, found))


def cmd_stream(a: argparse.Namespace) -> int:
    from harness.core.cases import make_inputs
    from harness.scale.localise import curve_markdown, curve_rows, locate
    from harness.core.metrics import METRICS
    from harness.core.presets import default_model
    from harness.suites.logits import check_device
    from harness.core.store import INFO, Row
    from harness.scale.stream import WeightSource, stream_compare

    _check_common(a)
    check_device(a.device)
    shape = _one_shape(a.shape)
    model = Path(a.model) if a.model else default_model()
    vocab = WeightSource(model).args.vocab_size
    ids = make_inputs(shape, vocab, a.seed)
    result = stream_compare(model, ids, a.dtype, a.device, a.attn, fine=not a.coarse, feed=a.feed)
    found = locate(result.order, result.transformers, result.reference, a.dtype)
    case = {"dtype": a.dtype, "attn": a.attn, "shape": str(shape), "device": a.device, "feed": a.feed}
    curves = {"reference": result.reference, "transformers": result.transformers}
    rows = curve_rows(SUITE_STREAM, case, result.order, curves, result.reference, a.dtype)
    for subject, (values, why) in result.metrics.items():
        rows += [Row(SUITE_STREAM, {**case, "layer": "-", "op": "logits"}, subject, "oracle-fp64", m, values[m],
                     status=INFO, reason=why or "logits metric; judged by `llama-parity logits`") for m in METRICS]
    extra = {"case": case, "model": str(model), "seed": a.seed,
             "truth": "oracle-fp64 (the reference entirely in float64)"}
    return _write(Path(a.out), SUITE_STREAM, rows, found, extra, a.device,
                  curve_markdown(result.order, curves, result.reference, a.dtype, found))


def _common(p) -> None:
    p.add_argument("--model", help="Meta or HF folder; default: the embedded model")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--attn", default="eager", help="attention implementation (default eager)")
    p.add_argument("--shape", default="1x16", help="BATCHxSEQ of the input (default 1x16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coarse", action="store_true", help="skip the per-op points (q, k, v, attention weights)")


def register(sub) -> None:
    lo = sub.add_parser("localise", help="name the first layer and op where transformers diverges")
    _common(lo)
    lo.add_argument("--tp", type=int, default=1, help="pretraining_tp (default 1)")
    lo.add_argument("--plant", help="plant a known porting bug in the transformers subject")
    lo.add_argument("--out", default="reports/latest/localise", help="output folder")
    lo.set_defaults(func=cmd_localise)

    st = sub.add_parser("stream", help="block-by-block comparison: peak memory about one block")
    _common(st)
    st.add_argument("--feed", default="own",
                    help="own: each subject carries its own stream; oracle: every block gets the oracle's input")
    st.add_argument("--out", default="reports/latest/stream", help="output folder")
    st.set_defaults(func=cmd_stream)


def main(argv: list[str] | None = None) -> int:
    """The full `llama-parity` CLI (these commands are registered there): same exit codes."""
    from harness.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

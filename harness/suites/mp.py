"""The model-parallel suite: does ``pretraining_tp = k`` bring transformers closer to the original
logits that Meta's code computed at model-parallel degree k?

transformers' docs: "Setting this to a value different than 1 will activate the more accurate
but slower computation of the linear layers, which should better match the original logits."

For each dtype and degree k the suite computes
- the *original logits*: the weights re-sharded into k ``consolidated.NN.pth`` files and run by
  ``reference_model.parallel`` (emulated ranks by default, real gloo/NCCL ranks with ``--ranks real``),
- transformers with ``pretraining_tp = 1`` and ``pretraining_tp = k``,
- the float64 oracle (exact math),
and measures every subject against both truths. The claim holds at a cell when tp=k is nearer the
original than tp=1 (by rel_l2); ``factor`` = rel_l2(tp=1) / rel_l2(tp=k) says by how much.
Rows are ``info`` (findings, not gates), except the emulation-vs-real check, which is judged.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reference_model import checkpoint
from reference_model.errors import CheckpointError
from reference_model.parallel import check_degree, distributed_logits, emulated_logits

from harness.core.cases import Shape, make_inputs
from harness.core.environment import environment
from harness.core.errors import InputError
from harness.core.metrics import METRICS, compare
from harness.core.store import FAIL, INFO, NA, PASS, Row, atomic_write_text, exit_code, write_results
from harness.core.subjects import DTYPES, HFFolder, ReferenceSubject, TransformersSubject, attn_implementations, tp_honoured

SUITE = "mp"
KEY_METRIC = "rel_l2"
CLAIM = ("pretraining_tp > 1 activates the more accurate but slower computation of the linear layers, "
         "which should better match the original logits (transformers' LlamaConfig docs)")


@dataclass
class MPRun:
    model: Path
    degrees: list[int]
    dtypes: list[str]
    shapes: list[Shape]
    attn: str = "eager"
    ranks: str = "emulated"          # or "real": torch.distributed ranks, one process per shard
    device: str = "cpu"
    seed: int = 0
    out: Path = Path("reports/latest/mp")
    log: list[str] = field(default_factory=list)


def _rows(case: dict, subject: str, against: str, values: dict, why: str) -> list[Row]:
    return [Row(SUITE, case, subject, against, m, values[m], status=INFO, reason=why) for m in METRICS]


def _original(run: MPRun, mp_path: Path, k: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    if run.ranks == "real":
        return distributed_logits(mp_path, ids, [DTYPES[d] for d in run.dtypes], device=run.device)
    return {d: emulated_logits(mp_path, ids, DTYPES[d], run.device) for d in run.dtypes}


def _rank_check(run: MPRun, mp_path: Path, k: int, ids: torch.Tensor, real: dict, shape: Shape) -> list[Row]:
    """Real ranks vs the emulation: bit-identical at k <= 2 (a two-term sum has no order); beyond,
    at most the rounding of the k-term sums, which is below the dtype's own error vs the oracle."""
    rows = []
    for dtype in run.dtypes:
        emu = emulated_logits(mp_path, ids, DTYPES[dtype], run.device)
        gap = (real[dtype] - emu).abs().max().item()
        tol = 0.0 if k <= 2 else 2 * (emu.double() - emulated_logits(mp_path, ids, torch.float64, run.device)).abs().max().item()
        case = {"dtype": dtype, "degree": k, "tp": "-", "shape": str(shape), "attn": "-"}
        status = PASS if gap <= tol else FAIL
        rows.append(Row(SUITE, case, "mp-real-ranks", "mp-emulated", "max_abs", gap, tolerance=tol, status=status,
                        reason="" if status == PASS else "real ranks and emulation disagree beyond reduction rounding"))
    return rows


def run_mp(run: MPRun) -> int:
    if run.ranks not in ("emulated", "real"):
        raise InputError(f"--ranks: {run.ranks!r} (emulated or real)")
    if not run.model.exists():
        raise InputError(f"--model: {run.model}: no such file or folder")
    for d in run.dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--dtypes: unknown dtype {d!r} (float32, bfloat16, float16)")
    for k in run.degrees:
        if k < 1:
            raise InputError(f"--degrees: {k} is not a positive integer")
    ckpt = checkpoint.load(run.model)
    why_attn = attn_implementations(run.device).get(run.attn, f"unknown attention implementation {run.attn}")
    if why_attn:
        raise InputError(f"--attn {run.attn}: {why_attn}")
    tp_live = tp_honoured()
    started = time.perf_counter()
    rows: list[Row] = []
    claims: list[dict] = []
    inputs = {s: make_inputs(s, ckpt.args.vocab_size, run.seed) for s in run.shapes}

    oracle = ReferenceSubject(ckpt, "float64", run.device, oracle=True)
    truth = {s: oracle.logits(ids).cpu() for s, ids in inputs.items()}
    del oracle

    hf = HFFolder(ckpt)
    tmp = tempfile.TemporaryDirectory(prefix="llama-parity-mp-")
    try:
        subjects: dict[tuple[str, int], dict[Shape, torch.Tensor]] = {}

        def hf_logits(dtype: str, tp: int) -> dict[Shape, torch.Tensor]:
            if (dtype, tp) not in subjects:
                subject = TransformersSubject(hf.path, dtype, run.device, run.attn, tp)
                subjects[(dtype, tp)] = {s: subject.logits(ids).float().cpu() for s, ids in inputs.items()}
                del subject
            return subjects[(dtype, tp)]

        for k in run.degrees:
            try:
                check_degree(ckpt.args, k, str(run.model))
            except CheckpointError as e:
                rows += [Row(SUITE, {"dtype": d, "degree": k, "tp": "-", "shape": str(s), "attn": run.attn},
                             "transformers", against, "all", None, status=NA, reason=f"degree {k}: {e.key} = {e.problem}")
                         for d in run.dtypes for s in run.shapes for against in ("mp-original", "oracle-fp64")]
                continue
            mp_path = checkpoint.save_meta(Path(tmp.name) / f"mp{k}", ckpt.args, ckpt.state, n_shards=k)
            for shape, ids in inputs.items():
                original = _original(run, mp_path, k, ids)
                if run.ranks == "real":
                    rows += _rank_check(run, mp_path, k, ids, original, shape)
                for dtype in run.dtypes:
                    case = {"dtype": dtype, "degree": k, "tp": "-", "shape": str(shape), "attn": "-"}
                    values, why = compare(original[dtype], truth[shape])
                    rows += _rows(case, "mp-original", "oracle-fp64", values, why)
                    dist = {}
                    for tp in dict.fromkeys((1, k)):
                        case = {"dtype": dtype, "degree": k, "tp": tp, "shape": str(shape), "attn": run.attn}
                        if tp > 1 and not tp_live:
                            rows += [Row(SUITE, case, "transformers", against, "all", None, status=NA,
                                         reason="pretraining_tp is a no-op in this transformers release "
                                                "(live only in 4.31-4.46)")
                                     for against in ("mp-original", "oracle-fp64")]
                            continue
                        logits = hf_logits(dtype, tp)[shape]
                        v_orig, why = compare(logits, original[dtype])
                        v_truth, why_t = compare(logits, truth[shape])
                        rows += _rows(case, "transformers", "mp-original", v_orig, why)
                        rows += _rows(case, "transformers", "oracle-fp64", v_truth, why_t)
                        dist[tp] = (v_orig[KEY_METRIC], v_truth[KEY_METRIC])
                    if k > 1 and len(dist) == 2:
                        claims.append(_claim(dtype, k, shape, dist[1], dist[k]))
    finally:
        hf.close()
        tmp.cleanup()

    extra = {
        "model": {"path": str(run.model), "format": ckpt.source, "args": dict(vars(ckpt.args))},
        "claim": CLAIM, "key_metric": KEY_METRIC, "ranks": run.ranks, "attn": run.attn, "seed": run.seed,
        "pretraining_tp_live": tp_live, "claims": claims,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    summary = write_results(run.out, SUITE, rows, environment(run.device), extra)
    atomic_write_text(run.out / "report.md", render_markdown(summary))
    return exit_code(rows)


def _claim(dtype: str, k: int, shape: Shape, tp1: tuple[float, float], tpk: tuple[float, float]) -> dict:
    (o1, t1), (ok, tk) = tp1, tpk
    return {
        "dtype": dtype, "degree": k, "shape": str(shape),
        "tp1_vs_original": o1, "tpk_vs_original": ok,
        "tp1_vs_oracle": t1, "tpk_vs_oracle": tk,
        "holds": ok < o1,
        # > 1: tp=k is that many times nearer the original logits; inf when it reproduces them exactly
        "factor": (o1 / ok) if ok > 0 else float("inf"),
        "more_accurate": tk < t1,
    }


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.3g}"


def render_markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        f"# Model-parallel suite: transformers {env.get('transformers')}, torch {env.get('torch')}",
        "",
        f"Claim tested: *{summary['claim']}*.",
        "",
        f"Original logits: Meta's model-parallel forward ({summary['ranks']} ranks). Distances are "
        f"`{summary['key_metric']}` of the logits; attention `{summary['attn']}`; "
        f"`pretraining_tp` live in this release: **{summary['pretraining_tp_live']}**.",
        "",
    ]
    if summary["claims"]:
        lines += ["| dtype | degree | shape | tp=1 vs original | tp=k vs original | holds | factor | "
                  "tp=1 vs oracle | tp=k vs oracle |", "|---|---|---|---|---|---|---|---|---|"]
        for c in summary["claims"]:
            lines.append(f"| {c['dtype']} | {c['degree']} | {c['shape']} | {_fmt(c['tp1_vs_original'])} | "
                         f"{_fmt(c['tpk_vs_original'])} | {'yes' if c['holds'] else 'no'} | {_fmt(c['factor'])} | "
                         f"{_fmt(c['tp1_vs_oracle'])} | {_fmt(c['tpk_vs_oracle'])} |")
    else:
        lines.append("No cell could test the claim here (pretraining_tp is not live, or no degree > 1 applies).")
    na = sorted({c["reason"] for c in summary["cells"] if c["status"] == NA})
    if na:
        lines += ["", "Not applicable:"] + [f"- {r}" for r in na]
    checks = [c for c in summary["cells"] if c["subject"] == "mp-real-ranks"]
    if checks:
        lines += ["", "Real ranks vs emulation (max |dlogit|):"]
        lines += [f"- {c['case']['dtype']} degree {c['case']['degree']}: {c['value']:.3g} "
                  f"(tolerance {c['tolerance']:.3g}, {c['status']})" for c in checks]
    return "\n".join(lines) + "\n"

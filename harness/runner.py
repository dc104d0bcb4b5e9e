"""The logits suite: run every subject over the case matrix, measure against the float64 oracle,
judge with the tolerance policy, write results.

Flow: checkpoint -> oracle logits per input shape -> reference at each dtype (the calibrator) ->
transformers per cell -> metrics -> verdict rows -> results.csv / summary.json / report.md.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from reference_model import checkpoint

from . import report
from .cases import Case, Shape, make_inputs, matrix
from .environment import environment
from .errors import InputError
from .faults import Fault
from .metrics import METRICS, compare
from .store import FAIL, NA, PASS, Row, exit_code, write_results
from .subjects import HFFolder, ReferenceSubject, TransformersSubject, attn_implementations, tp_honoured
from .tolerance import Policy

SUITE = "logits"
TRUTH = ("oracle-fp64: the reference run entirely in float64, RoPE angles included "
         "(exact math; Meta's own code and transformers compute the angles in float32)")


@dataclass
class LogitsRun:
    model: Path
    dtypes: list[str]
    attns: list[str]
    tps: list[int]
    shapes: list[Shape]
    device: str = "cpu"
    seed: int = 0
    policy: Policy | None = None
    fault: Fault | None = None
    out: Path = Path("reports/latest/logits")
    progress: bool = True
    log: list[str] = field(default_factory=list)


def check_device(device: str) -> None:
    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available on this machine")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    raise InputError(f"--device: unknown device {device!r} (cpu, cuda or cuda:N)")


def _metric_rows(case: dict, subject: str, against: str, values: dict, reason: str) -> list[Row]:
    return [Row(SUITE, case, subject, against, m, values[m], status=FAIL if reason else PASS, reason=reason)
            for m in METRICS]


def _judge(rows: list[Row], policy: Policy, dtype: str, reference: dict | None) -> list[Row]:
    for r in rows:
        tol, status, why = policy.judge(dtype, r.metric, r.value, None if reference is None else reference[r.metric])
        r.tolerance = tol
        if r.status != FAIL:
            r.status, r.reason = status, why
    return rows


def run_logits(run: LogitsRun) -> int:
    check_device(run.device)
    ckpt = checkpoint.load(run.model)
    policy = run.policy
    support = environment(run.device)["dtype_support"]
    vocab = ckpt.args.vocab_size
    inputs = {s: make_inputs(s, vocab, run.seed) for s in run.shapes}
    rows: list[Row] = []
    started = time.perf_counter()

    oracle = ReferenceSubject(ckpt, "float64", run.device, oracle=True)
    truth = {s: oracle.logits(ids).cpu() for s, ids in inputs.items()}
    del oracle

    hf = HFFolder(ckpt)
    cells = matrix(run.dtypes, run.attns, run.tps, run.shapes, run.device)
    bar = tqdm(total=len(run.dtypes) * len(run.shapes) + len(cells), desc="logits", unit="cell",
               disable=not run.progress, file=sys.stderr)
    try:
        for dtype in run.dtypes:
            ref_metrics: dict[Shape, dict] = {}
            ref_logits: dict[Shape, torch.Tensor] = {}
            if not support.get(dtype, False):
                why = f"{dtype} does not run on {run.device}"
                rows += [Row(SUITE, c.settings(), "transformers", "oracle-fp64", "all", None, status=NA, reason=why)
                         for c in cells if c.dtype == dtype]
                bar.update(len(run.shapes) + sum(c.dtype == dtype for c in cells))
                continue
            reference = ReferenceSubject(ckpt, dtype, run.device)
            for shape in run.shapes:
                ref_logits[shape] = reference.logits(inputs[shape]).cpu()
                values, why = compare(ref_logits[shape], truth[shape])
                ref_metrics[shape] = values
                case = {"dtype": dtype, "attn": "-", "tp": "-", "shape": str(shape), "device": run.device}
                rows += _judge(_metric_rows(case, "reference", "oracle-fp64", values, why), policy, dtype, None)
                bar.update(1)
            del reference
            for key in sorted({(c.attn, c.tp) for c in cells if c.dtype == dtype}, key=str):
                attn, tp = key
                group = [c for c in cells if c.dtype == dtype and (c.attn, c.tp) == key]
                rows += _run_transformers(run, hf, dtype, attn, tp, group, inputs, truth, ref_logits, ref_metrics, policy)
                bar.update(len(group))
    finally:
        bar.close()
        hf.close()

    summary_extra = {
        "model": {"path": str(run.model), "format": ckpt.source, "shards": ckpt.n_shards,
                  "args": {k: v for k, v in vars(ckpt.args).items()}},
        "truth": TRUTH,
        "seed": run.seed,
        "policy": {"path": str(policy.path), "version": policy.version},
        "plant": run.fault.name if run.fault else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    summary = write_results(run.out, SUITE, rows, environment(run.device), summary_extra)
    report.write_markdown(run.out / "report.md", summary)
    report.print_console(summary)
    return exit_code(rows)


def _run_transformers(run, hf, dtype, attn, tp, group: list[Case], inputs, truth, ref_logits, ref_metrics, policy):
    rows = []
    why_na = attn_implementations(run.device).get(attn, f"unknown attention implementation {attn}")
    if not why_na and tp > 1 and not tp_honoured():
        why_na = "pretraining_tp is a no-op in this transformers release (live only in 4.31-4.46)"
    if run.fault is not None and dtype not in run.fault.visible_at:
        run.log.append(f"note: --plant {run.fault.name} changes nothing at {dtype}")
    if why_na:
        return [Row(SUITE, c.settings(), "transformers", "oracle-fp64", "all", None, status=NA, reason=why_na)
                for c in group]
    try:
        subject = TransformersSubject(hf.path, dtype, run.device, attn, tp, run.fault)
    except InputError:
        raise
    except Exception as e:  # a release that cannot build this cell fails it, naming the error
        why = f"transformers failed to load: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return [Row(SUITE, c.settings(), "transformers", "oracle-fp64", "all", None, status=FAIL, reason=why)
                for c in group]
    for case in group:
        try:
            logits = subject.logits(inputs[case.shape]).cpu()
        except Exception as e:
            why = f"transformers forward failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(Row(SUITE, case.settings(), "transformers", "oracle-fp64", "all", None, status=FAIL, reason=why))
            continue
        values, why = compare(logits, truth[case.shape])
        rows += _judge(_metric_rows(case.settings(), "transformers", "oracle-fp64", values, why),
                       policy, dtype, ref_metrics[case.shape])
        pair, why = compare(logits, ref_logits[case.shape])
        for m in METRICS:
            rows.append(Row(SUITE, case.settings(), "transformers", "reference", m, pair[m], status="info",
                            reason=why or "informational: same dtype, no truth"))
    return rows

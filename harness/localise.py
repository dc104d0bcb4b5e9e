"""Where does a subject start to diverge? Per-point error curves and the first-divergence rule.

Every point (``harness.capture``) of a subject is measured against the float64 oracle as a
relative L2 error. A correct implementation at a low dtype drifts too, so each error is read
against the drift of the reference at the same dtype and point (the same calibration the
tolerance policy uses for logits):

    ratio(p) = err_subject(p) / max(err_reference(p), floor(dtype))

``floor`` is the dtype's machine epsilon: below it both errors are rounding of one value.

**The rule.** The first divergence is the first point, in forward order, with
``ratio(p) > RATIO_LIMIT``. Every earlier point then sits within ``RATIO_LIMIT`` of what a correct
implementation drifts there, so the excess at p is not inherited from the layers before it:
p's own computation added it. The error *jump* at p (its ratio over the largest ratio before it)
is reported beside it, so a reader can tell a sharp fault (a jump of 100x) from a slow creep that
merely crossed the line (a jump near 1).

RATIO_LIMIT = 8: on correct models a subject's per-point ratio stays below 3 at every dtype
(``tests/test_localise.py`` measures it over every point of tiny MHA/GQA models at float32,
bfloat16 and float16); the planted faults in the tests give ratios of 10^3 and more.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from .capture import GROUP, Capture, Errors, Point, Store, point_name, point_order

RATIO_LIMIT = 8.0
FLOOR = {"float32": torch.finfo(torch.float32).eps, "bfloat16": torch.finfo(torch.bfloat16).eps,
         "float16": torch.finfo(torch.float16).eps, "float64": torch.finfo(torch.float64).eps}


def ratios(subject: dict[Point, float], reference: dict[Point, float], dtype: str) -> dict[Point, float]:
    floor = FLOOR[dtype]
    return {p: subject[p] / max(reference.get(p, 0.0), floor) for p in subject}


def locate(order: list[Point], subject: dict[Point, float], reference: dict[Point, float], dtype: str,
           limit: float = RATIO_LIMIT) -> dict:
    """The first-divergence record: layer/op (both None when no point breaks the rule) and why."""
    r = ratios(subject, reference, dtype)
    worst_before = 0.0
    for p in order:
        if p not in r:
            continue
        value = r[p]
        if not math.isfinite(subject[p]) or value > limit:
            layer, op = p
            return {"layer": layer, "op": op, "group": GROUP[op], "point": point_name(p),
                    "subject_error": subject[p], "reference_error": reference.get(p),
                    "ratio": value, "jump": value / max(worst_before, 1.0),
                    "rule": f"first point with error > {limit:g}x the reference's at {dtype}"}
        worst_before = max(worst_before, value)
    return {"layer": None, "op": None, "group": None, "point": None,
            "rule": f"no point with error > {limit:g}x the reference's at {dtype}"}


# --- full-model capture of the three runs -----------------------------------------------------

def capture_full(ckpt, hf_path: Path, ids: torch.Tensor, dtype: str, device: str = "cpu",
                 attn: str = "eager", tp: int = 1, fault=None, fine: bool = True):
    """Oracle, reference at dtype and transformers at dtype over ids, one model at a time.

    Returns (order, reference errors, transformers errors); errors are point -> rel L2 against
    the oracle. Only the oracle's activations are kept; the subjects are measured as they run.
    """
    from .subjects import ReferenceSubject, TransformersSubject

    oracle = ReferenceSubject(ckpt, "float64", device, oracle=True)
    truth = Store()
    with Capture(truth, fine).reference(oracle.model):
        oracle.logits(ids)
    del oracle

    reference = ReferenceSubject(ckpt, dtype, device)
    ref_err = Errors(truth)
    with Capture(ref_err, fine).reference(reference.model):
        reference.logits(ids)
    del reference

    subject = TransformersSubject(hf_path, dtype, device, attn, tp, fault)
    tf_err = Errors(truth)
    with Capture(tf_err, fine).transformers(subject.model):
        subject.logits(ids)
    del subject
    return point_order(ckpt.args.n_layers, fine), ref_err.errors, tf_err.errors


def first_divergence(ckpt, hf_path: Path, ids: torch.Tensor, dtype: str, device: str = "cpu",
                     attn: str = "eager", tp: int = 1, fault=None, fine: bool = True) -> dict:
    """``{"layer": ..., "op": ..., ...}`` for transformers at this cell (see ``locate``).

    ckpt: a reference_model.checkpoint.Checkpoint; hf_path: the HF folder transformers loads
    (``HFFolder(ckpt).path``); ids: the cell's token ids (batch, seq); the rest as in the cell.
    """
    order, ref, tf = capture_full(ckpt, hf_path, ids, dtype, device, attn, tp, fault, fine)
    return locate(order, tf, ref, dtype)


def curve_rows(suite: str, case: dict, order: list[Point], curves: dict[str, dict[Point, float]],
               reference: dict[Point, float], dtype: str, limit: float = RATIO_LIMIT):
    """Rows of the common schema: the reference's curve as info, each other subject's judged."""
    from .store import FAIL, INFO, PASS, Row
    rows = []
    for name, errors in curves.items():
        r = ratios(errors, reference, dtype)
        for p in order:
            if p not in errors:
                continue
            layer, op = p
            pcase = {**case, "layer": "-" if layer is None else layer, "op": op}
            if name == "reference":
                rows.append(Row(suite, pcase, name, "oracle-fp64", "rel_l2", errors[p], status=INFO,
                                reason="calibration: the reference's own drift at this dtype"))
            else:
                bad = not math.isfinite(errors[p]) or r[p] > limit
                tol = limit * max(reference.get(p, 0.0), FLOOR[dtype])
                rows.append(Row(suite, pcase, name, "oracle-fp64", "rel_l2", errors[p], tolerance=tol,
                                status=FAIL if bad else PASS,
                                reason=f"{r[p]:.3g}x the reference's error" if bad else ""))
    return rows


def curve_markdown(order: list[Point], curves: dict[str, dict[Point, float]], reference: dict[Point, float],
                   dtype: str, found: dict) -> str:
    """The per-layer error curve of each subject as a table, first divergence marked."""
    names = list(curves)
    head = "| point | " + " | ".join(f"{n} rel L2" for n in names) + " | ratio |\n"
    head += "|---|" + "---|" * (len(names) + 1) + "\n"
    lines = []
    subject = next((n for n in names if n != "reference"), None)
    r = ratios(curves[subject], reference, dtype) if subject else {}
    for p in order:
        if not any(p in c for c in curves.values()):
            continue
        mark = " **<- first divergence**" if found.get("point") == point_name(p) else ""
        cells = " | ".join(_fmt(c.get(p)) for c in curves.values())
        lines.append(f"| {point_name(p)} | {cells} | {_fmt(r.get(p))}{mark} |")
    return head + "\n".join(lines) + "\n"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"
